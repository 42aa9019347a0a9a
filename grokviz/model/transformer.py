"""The whole model: embed -> lax.scan(block) over stacked layers -> final norm -> tied unembedding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..hooks import ATTENTION_MAPS, REGISTRY, AttentionSpec, Point
from ..params import dense
from .attention import attention_mask, attention_maps
from .block import EXPERT_IMPLS, block
from .layers import rms_norm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    logits: jax.Array  # [batch, seq, vocab]
    cache: dict        # hook name -> array ([layer, ...] for blocks.* hooks)


def _selected_maps(capture, spec, cfg):
    """Attention maps captured only for some layers: {name: layers tuple}, or {} when all layers."""
    if spec is None or spec.layers is None:
        return {}
    layers = tuple(sorted({l % cfg.num_layers for l in spec.layers}))
    return {n: layers for n in ATTENTION_MAPS if n in capture}


def _select_heads(name, value, spec):
    if spec is None or spec.heads is None or name not in ATTENTION_MAPS:
        return value
    return jnp.take(value, jnp.asarray(spec.heads), axis=REGISTRY[name].axes.index("head") - 1)


def forward(params, tokens, cfg, *, capture=frozenset(), interventions=None, expert_impl="sparse",
            unroll=False, callbacks=None, attn_spec: AttentionSpec | None = None, length=None) -> Output:
    """Pure forward pass. tokens: int [batch, seq] (pad id = padding, masked as keys only).

    ``capture``: frozenset of registered hook names (see :func:`grokviz.hooks.select`).
    ``interventions``: a :class:`grokviz.interventions.Interventions` (or None for none at all).
    ``expert_impl``: "sparse" (fast) or "dense" (reference). ``unroll``: Python loop instead of lax.scan.
    ``callbacks``: {hook name: fn(value, layer) -> value}; static (changing them recompiles).
    ``attn_spec``: :class:`grokviz.hooks.AttentionSpec` — which layers/heads keep full attention maps, and the
    parameters of the reduced attention hooks. Maps kept for selected layers only are stacked over those
    layers (in increasing order) and never materialised for the others.
    ``length``: true length when ``tokens`` were right-padded to a bucket (see :func:`attention_mask`).
    """
    if expert_impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be one of {sorted(EXPERT_IMPLS)}, got {expert_impl!r}")
    callbacks = callbacks or {}
    iv_layers, patches = (None, {}) if interventions is None else interventions.split()
    top_patches = {k: v for k, v in patches.items() if not k.startswith("blocks.")}
    block_patches = {k: v for k, v in patches.items() if k.startswith("blocks.")}
    top = Point(capture, patches=top_patches, callbacks=callbacks)

    real = tokens > cfg.pad_token
    mask = attention_mask(tokens, cfg.pad_token, length)
    emb = dense(params["embed"], jnp.float32)
    h = top("embed.out", emb[tokens] * cfg.embedding_multiplier)

    # Attention maps wanted for some layers only. Normally the layer's attention input is kept for those
    # layers and the maps are recomputed from it after the scan (the same computation), so no layer ever holds
    # a full map it does not return; with patches or callbacks on q/k/maps they are kept from inside the scan.
    kept = _selected_maps(capture, attn_spec, cfg)
    sel = next(iter(kept.values()), ())
    interfering = {"blocks.attn.q", "blocks.attn.k", *ATTENTION_MAPS}
    recompute = bool(kept) and not any(n in block_patches or n in callbacks for n in interfering)
    body_capture, buffered = capture, dict(kept)
    if recompute:
        body_capture = (capture - set(kept)) | {"blocks.attn.pre_norm"}
        buffered = {"blocks.attn.pre_norm": sel}
    slot_of_layer = np.full(cfg.num_layers, len(sel), np.int32)
    for i, l in enumerate(sel):
        slot_of_layer[l] = i  # other layers write into a spare slot that is dropped at the end
    slot_of_layer = jnp.asarray(slot_of_layer)

    def body(carry, xs):
        h, bufs = carry
        p, iv, pt, layer = xs
        point = Point(body_capture, prefix="blocks.", patches=pt, callbacks=callbacks, layer=layer)
        h, caps = block(p, h, real, mask, cfg, point, iv, expert_impl, attn_spec)
        caps = {k: _select_heads(k, v, attn_spec) for k, v in caps.items()}
        new_bufs = {}
        for name in buffered:
            value = caps[name] if (recompute and name in capture) else caps.pop(name)
            buf = bufs[name] if name in bufs else jnp.zeros((len(sel) + 1,) + value.shape, value.dtype)
            new_bufs[name] = jax.lax.dynamic_update_index_in_dim(buf, value, slot_of_layer[layer], 0)
        return (h, new_bufs), caps

    xs = (params["blocks"], iv_layers, block_patches, jnp.arange(cfg.num_layers))
    if kept:  # allocate the buffers from one abstract evaluation of the body
        shapes = jax.eval_shape(lambda c, x: body(c, x)[0][1], (h, {}),
                                jax.tree_util.tree_map(lambda a: a[0], xs))
        bufs = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    else:
        bufs = {}
    if unroll:
        per_layer = []
        for i in range(cfg.num_layers):
            (h, bufs), c = body((h, bufs), jax.tree_util.tree_map(lambda a, i=i: a[i], xs))
            per_layer.append(c)
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_layer) if per_layer[0] else {}
    else:
        (h, bufs), stacked = jax.lax.scan(body, (h, bufs), xs)
    if recompute:
        inputs = bufs["blocks.attn.pre_norm"]
        maps = [attention_maps(jax.tree_util.tree_map(lambda a, l=l: a[l], params["blocks"]), inputs[i], mask, cfg)
                for i, l in enumerate(sel)]
        for name in kept:
            stacked[name] = jnp.stack([_select_heads(name, m[name.rsplit(".", 1)[1]], attn_spec) for m in maps])
    else:
        stacked.update({k: v[:-1] for k, v in bufs.items()})

    hf = top("final_norm.out", rms_norm(h, params["final_norm"], cfg.rms_eps))
    logits = jnp.einsum("btd,vd->btv", hf, emb.astype(hf.dtype)) * cfg.output_multiplier
    logits = top("unembed.logits", logits)
    return Output(logits=logits, cache={**top.values, **stacked})


def cache_layout(capture, cfg, attn_spec: AttentionSpec | None) -> dict:
    """{name: (layers, heads)} for hooks stored with a subset of layers or heads (see ActivationCache)."""
    kept = _selected_maps(capture, attn_spec, cfg)
    out = {}
    for name in capture:
        if name in ATTENTION_MAPS and attn_spec is not None and (attn_spec.layers or attn_spec.heads):
            out[name] = (kept.get(name), attn_spec.heads)
    return out
