"""Full attention maps kept for some layers only (``AttentionSpec.layers``), and the cache layout they give.

A full map is ``[batch, head, seq, kv_seq]`` per layer; :func:`grokviz.model.run_blocks` never stacks one over
all layers when only some are wanted. Normally a selected layer's attention *input* (``attn.pre_norm``) is
written into a small buffer inside the scan and the maps are recomputed from it afterwards (the same
computation as inside the block). When a patch or a callback touches q, k or the maps themselves, recomputing
would not see it, so the maps are written into the buffer from inside the scan instead. The buffer has one
slot per selected layer plus a spare slot that every other layer writes into and that is dropped at the end.

Buffers are allocated from the hook registry's axes and the run's sizes, without tracing the block (so user
callbacks run exactly once per trace of the block).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..hooks import ATTENTION_MAPS, REGISTRY, AttentionSpec
from ..params import DENSE_LEAVES, MOE_LEAVES
from .attention import attention_maps

# hooks that, when patched or given a callback, stop the maps from being recomputed after the scan
_INTERFERING = frozenset({"blocks.attn.q", "blocks.attn.k", *ATTENTION_MAPS})


def select_heads(name, value, spec: AttentionSpec | None):
    """A map's selected query heads (``spec.heads``); any other hook is returned unchanged."""
    if spec is None or spec.heads is None or name not in ATTENTION_MAPS:
        return value
    return jnp.take(value, jnp.asarray(spec.heads), axis=REGISTRY[name].axes.index("head") - 1)


def kept_layers(capture, spec: AttentionSpec | None, cfg, layers=None) -> dict:
    """{map name: sorted layer numbers} for maps captured for some layers only; {} when all layers are kept.

    ``layers``: the layer numbers the run covers (default all); selected layers outside it are not kept."""
    if spec is None or spec.layers is None:
        return {}
    run = range(cfg.num_layers) if layers is None else layers
    sel = tuple(sorted({l % cfg.num_layers for l in spec.layers} & set(run)))
    return {n: sel for n in ATTENTION_MAPS if n in capture}


def cache_layout(capture, spec: AttentionSpec | None, cfg, layers=None) -> dict:
    """{name: (layers or None, heads or None)} for the captured hooks stored with a subset of layers or heads
    (the layout :class:`grokviz.cache.ActivationCache` takes)."""
    if spec is None or not (spec.layers or spec.heads):
        return {}
    kept = kept_layers(capture, spec, cfg, layers)
    return {n: (kept.get(n), spec.heads) for n in sorted(capture) if n in ATTENTION_MAPS}


def axis_sizes(cfg, batch: int, seq: int, spec: AttentionSpec | None) -> dict:
    """Size of every registered axis in a run of ``[batch, seq]`` tokens (maps with ``spec.heads`` only)."""
    spec = spec or AttentionSpec()
    return {"layer": cfg.num_layers, "batch": batch, "seq": seq, "kv_seq": seq, "d_model": cfg.d_model,
            "head": cfg.num_q_heads if spec.heads is None else len(spec.heads), "kv_head": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "expert": cfg.num_experts, "k": cfg.top_k, "ffn": cfg.ffn_size,
            "vocab": cfg.vocab_size, "query": len(spec.queries), "rank": spec.top_keys}


@dataclasses.dataclass(frozen=True)
class MapBuffers:
    """How the maps of selected layers are kept in one run of the blocks (see the module docstring)."""

    kept: dict           # {map name: selected layers}, as kept_layers
    recompute: bool      # buffer attn.pre_norm and recompute the maps after the scan
    buffered: tuple      # hook names written into buffers inside the scan
    slot_of_layer: np.ndarray  # [num_layers] int32: buffer slot of each layer (the spare slot for others)

    @classmethod
    def plan(cls, capture, spec, cfg, patches, callbacks, layers=None, recompute_ok=True) -> MapBuffers | None:
        """``recompute_ok=False`` (a run with a KV cache, whose keys are not recomputable from the layer input)
        writes the maps from inside the scan."""
        kept = kept_layers(capture, spec, cfg, layers)
        if not kept:
            return None
        sel = next(iter(kept.values()))
        recompute = recompute_ok and not any(n in patches or n in callbacks for n in _INTERFERING)
        buffered = ("blocks.attn.pre_norm",) if recompute else tuple(kept)
        slot = np.full(cfg.num_layers, len(sel), np.int32)
        slot[list(sel)] = np.arange(len(sel), dtype=np.int32)
        return cls(kept, recompute, buffered, slot)

    @property
    def layers(self) -> tuple:
        return next(iter(self.kept.values()))

    def body_capture(self, capture) -> frozenset:
        """What the scanned block must capture: with recomputation, attn.pre_norm instead of the kept maps."""
        return (frozenset(capture) - set(self.kept)) | {"blocks.attn.pre_norm"} if self.recompute else capture

    def allocate(self, cfg, batch, seq, spec, kv_seq=None) -> dict:
        """Zeroed buffers {name: [selected layers + 1, ...]} with the hook's registered dtype (``kv_seq``: the key
        axis when it differs from ``seq``, as with a KV cache)."""
        sizes = axis_sizes(cfg, batch, seq, spec)
        if kv_seq is not None:
            sizes["kv_seq"] = kv_seq
        out = {}
        for name in self.buffered:
            hook = REGISTRY[name]
            shape = (len(self.layers) + 1,) + tuple(sizes[a] for a in hook.axes if a != "layer")
            out[name] = jnp.zeros(shape, hook.dtype)
        return out

    def write(self, bufs, caps, capture, layer) -> dict:
        """Inside the scan body: write this layer's buffered values into its slot; values not captured for
        every layer are removed from ``caps``. Returns the new buffers."""
        new = {}
        for name, buf in bufs.items():
            value = caps[name] if (self.recompute and name in capture) else caps.pop(name)
            if value.shape != buf.shape[1:] or value.dtype != buf.dtype:
                raise ValueError(f"{name} is {value.dtype}{list(value.shape)} in the block but its buffer of "
                                 f"selected layers is {buf.dtype}{list(buf.shape[1:])}")
            new[name] = jax.lax.dynamic_update_index_in_dim(buf, value, jnp.asarray(self.slot_of_layer)[layer], 0)
        return new

    def finish(self, bufs, stacked, params, masks, cfg, spec) -> dict:
        """After the scan: the kept maps, stacked over the selected layers, added to ``stacked``. ``masks``: the
        run's :class:`grokviz.model.transformer.Masks`."""
        if self.recompute:
            inputs = bufs["blocks.attn.pre_norm"]
            attn = {n: v for n, v in params["blocks"].items() if n not in MOE_LEAVES and n not in DENSE_LEAVES}
            maps = []
            for i, l in enumerate(self.layers):
                mask = masks.window if cfg.layer_is_sliding[l] else masks.full
                maps.append(attention_maps(jax.tree_util.tree_map(lambda a, l=l: a[l], attn), inputs[i], mask, cfg,
                                           masks.positions, spec))
            for name in self.kept:
                stacked[name] = jnp.stack([select_heads(name, m[name.rsplit(".", 1)[1]], spec) for m in maps])
        else:
            stacked.update({k: v[:-1] for k, v in bufs.items()})
        return stacked
