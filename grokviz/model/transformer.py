"""The whole model: :func:`embed` -> :func:`run_blocks` (lax.scan of the block over stacked layers) ->
:func:`unembed` (final norm, unembedding, output multiplier). :func:`forward` is exactly these three; the
analysis code (patching, logit lens) calls the parts, e.g. to run the blocks from a given layer on. Every model
family runs through these same functions; the config's fields select the variant (docs/families.md)."""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np

from ..config import is_real
from ..hooks import ROUTING_HOOKS, AttentionSpec, Point, select
from ..kernels.fused import maps_buffer
from ..params import DENSE_LEAVES, MOE_LEAVES, dense
from .attention import MASK_VALUE, attention_mask, positions_of, window_allowed, with_impl, write_cache
from .block import EXPERT_IMPLS, block
from .kvcache import KVCache
from .layers import rms_norm
from .maps import MapBuffers, cache_layout, select_heads


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    logits: jax.Array  # [batch, seq, vocab]
    cache: dict        # hook name -> array ([layer, ...] for blocks.* hooks)
    #: ((name, (layers or None, heads or None)), ...): captured hooks stored for some layers/heads only, in the
    #: order of their leading axes (see ActivationCache); static, so ``dict(out.layout)`` needs no device sync
    layout: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    #: the updated KV cache when the forward ran with one (else None)
    kv: KVCache | None = None


class Blocks(typing.NamedTuple):
    """What :func:`run_blocks` returns."""

    h: jax.Array   # the residual stream leaving the last layer run
    cache: dict    # blocks.* hook name -> [layers run (or selected layers), ...]
    layout: dict   # as Output.layout, for the hooks in ``cache``
    kv: KVCache | None = None  # the updated KV cache when run with one


def embed(params, tokens, cfg, point: Point | None = None):
    """tokens int [batch, seq] -> the residual stream into layer 0 (``embed.out``): embedding x multiplier.

    Shape and dtype are checked always, ids against the vocabulary when ``tokens`` are concrete (a gather would
    clamp an out-of-range id silently); inside ``jit`` the caller checks ids (``Model.run`` does)."""
    if jnp.ndim(tokens) != 2 or 0 in jnp.shape(tokens) or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"tokens must be integer ids of shape [batch, seq] with seq > 0, got shape "
                         f"{tuple(jnp.shape(tokens))} and dtype {jnp.result_type(tokens)}")
    if not isinstance(tokens, jax.core.Tracer):
        ids = np.asarray(tokens)
        ids = ids[ids != cfg.pad_token] if cfg.pad_token < 0 else ids
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    if cfg.pad_token < 0:  # the padding id -1 is outside the table: embed it as row 0 (never attended to)
        tokens = jnp.maximum(tokens, 0)
    h = dense(params["embed"], jnp.float32)[tokens] * cfg.embedding_multiplier
    return h if point is None else point("embed.out", h)


def unembed(params, h, cfg, point: Point | None = None):
    """h [..., d_model] -> logits [..., vocab]: final rms_norm (``final_norm.out``), unembedding (the embedding
    table when tied, else ``unembed``), output multiplier (``unembed.logits``). The readout of the model, and of
    the logit lens at any layer."""
    if jnp.ndim(h) < 1 or jnp.shape(h)[-1] != cfg.d_model:
        raise ValueError(f"unembed: h must have shape [..., d_model={cfg.d_model}], got {tuple(jnp.shape(h))}")
    point = point or Point()
    hf = point("final_norm.out", rms_norm(h, params["final_norm"], cfg.rms_eps))
    table = params["embed"] if cfg.tie_embeddings else params["unembed"]
    logits = jnp.einsum("...d,vd->...v", hf, dense(table, hf.dtype)) * cfg.output_multiplier
    return point("unembed.logits", logits)


def _check_blocks_args(cfg, expert_impl, patches, start_layer, stop_layer, capture, callbacks):
    if expert_impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be one of {sorted(EXPERT_IMPLS)}, got {expert_impl!r}")
    wrong = sorted(k for k in patches if not k.startswith("blocks."))
    if wrong:
        raise ValueError(f"run_blocks applies blocks.* patches only, got {wrong} (forward applies the others)")
    L = cfg.num_layers
    if stop_layer is not None and not 0 <= stop_layer <= L:
        raise ValueError(f"stop_layer must be in [0, {L}], got {stop_layer}")
    if isinstance(start_layer, int):
        if not 0 <= start_layer <= (L if stop_layer is None else stop_layer):
            raise ValueError(f"start_layer must be in [0, {L if stop_layer is None else stop_layer}], "
                             f"got {start_layer}")
    elif capture or callbacks:
        raise ValueError("capture and callbacks need a Python int start_layer (a traced one skips layers "
                         "inside the scan, which gives them nothing to record)")


class Masks(typing.NamedTuple):
    """The attention masks and positions of one run of the blocks, shared by its layers."""

    positions: jax.Array      # [b, t] RoPE positions of the tokens
    full: tuple               # (allowed [b, 1, t, s], fill) of full-attention layers
    window: tuple | None      # the same for sliding-window layers (None when the model has none)
    kv_meta: tuple | None     # (real, pos, step, next_pos) of the updated KV cache


def build_masks(tokens, cfg, length=None, kv: KVCache | None = None) -> Masks:
    """Masks for ``tokens`` [b, t]: without a cache, key padding x causal over the chunk (:func:`attention_mask`);
    with one, over the cache's slots after writing the chunk (see :mod:`grokviz.model.kvcache`)."""
    real = is_real(tokens, cfg.pad_token)
    if kv is None:
        positions = positions_of(tokens, cfg)
        allowed, fill = attention_mask(tokens, cfg.pad_token, length)
        k_pos, meta = positions, None
    else:
        t = tokens.shape[1]
        positions = positions_of(tokens, cfg, kv.next_pos)
        slots_real = write_cache(kv.real, real, kv.step)
        k_pos = write_cache(kv.pos, positions, kv.step)
        q_slot = jnp.reshape(kv.step, (-1, 1)) + jnp.arange(t, dtype=jnp.int32)[None]      # [b or 1, t]
        causal = jnp.arange(kv.size, dtype=jnp.int32)[None, None, :] <= q_slot[:, :, None]   # [b, t, S]
        allowed, fill = (slots_real[:, None, :] & causal)[:, None], jnp.float32(MASK_VALUE)
        advance = jnp.sum(real, axis=1, dtype=jnp.int32) if cfg.position_rule == "real_count" else t
        meta = (slots_real, k_pos, kv.step + t, kv.next_pos + advance)
    window = None
    if any(cfg.layer_is_sliding):
        window = (window_allowed(allowed, positions, k_pos, cfg.sliding_window), fill)
    return Masks(positions, (allowed, fill), window, meta)


def _layer_mask(masks: Masks, cfg, sliding):
    """This layer's (allowed, fill); ``sliding``: traced bool of the layer (None when every layer is alike)."""
    if masks.window is None:
        return masks.full
    if all(cfg.layer_is_sliding):
        return masks.window
    return jnp.where(sliding, masks.window[0], masks.full[0]), masks.full[1]


def segments(cfg, layers: range) -> list[tuple[int, int, bool]]:
    """``layers`` split into runs of consecutive MoE or dense layers: [(start, stop, is_moe), ...]. Each run is
    one ``lax.scan`` (a model whose layers are all MoE has one)."""
    out = []
    for layer in layers:
        moe = cfg.is_moe(layer)
        if out and out[-1][2] == moe and out[-1][1] == layer:
            out[-1] = (out[-1][0], layer + 1, moe)
        else:
            out.append((layer, layer + 1, moe))
    return out


def _segment_params(blocks, cfg, a, b, moe):
    """The block params of layers [a, b) (all of one kind), each leaf sliced by its own layer axis."""
    m0 = sum(1 for i in cfg.moe_layer_ids if i < a)
    d0 = sum(1 for i in cfg.dense_layer_ids if i < a)
    out = {}
    for name, leaf in blocks.items():
        if name in MOE_LEAVES:
            if moe:
                out[name] = jax.tree_util.tree_map(lambda x: x[m0:m0 + b - a], leaf)
        elif name in DENSE_LEAVES:
            if not moe:
                out[name] = jax.tree_util.tree_map(lambda x: x[d0:d0 + b - a], leaf)
        else:
            out[name] = jax.tree_util.tree_map(lambda x: x[a:b], leaf)
    return out


def split_layers(params, cfg) -> dict:
    """``params`` with ``blocks`` as a tuple of per-layer dicts (each leaf that layer's slice, by its own layer
    axis), for an unrolled run (``run_blocks(..., unroll=True)`` accepts either form; the result is the same).

    Why: inside a loop (the decode loop of :mod:`grokviz.generation.loop`) XLA CPU copies a static layer slice of
    a stacked leaf out of it on every iteration before a matmul reads it (config of record, batch 4: 12 MB of
    expert weights per layer and step). Slicing once before the loop makes the slices loop invariants, read in
    place."""
    layers = tuple(jax.tree_util.tree_map(lambda x: x[0], _segment_params(params["blocks"], cfg, la, la + 1,
                                                                          cfg.is_moe(la)))
                   for la in range(cfg.num_layers))
    return {**params, "blocks": layers}


#: the hook kept for every layer in one carried buffer written in place (under the fused kernel)
INPLACE_MAP = "blocks.attn.pattern"


def run_blocks(params, h, tokens, cfg, *, start_layer=0, stop_layer=None, length=None, capture=frozenset(),
               interventions=None, patches=None, callbacks=None, expert_impl="sparse", unroll=False,
               attn_spec: AttentionSpec | None = None, kv: KVCache | None = None, attn_impl="auto") -> Blocks:
    """Run layers ``start_layer .. stop_layer - 1`` on the residual stream ``h`` [batch, seq, d_model], which is
    ``resid_pre`` of ``start_layer``. ``tokens`` (int [batch, seq]) give padding, positions and the attention mask.

    ``start_layer``: a Python int (only those layers are scanned; captures have one entry per layer run) or a
    traced int (every layer is scanned and those before it are skipped by ``lax.cond``, so all starts share one
    compiled program; no capture or callbacks then). ``interventions``: the per-layer arrays of
    :meth:`grokviz.interventions.Interventions.split` ({field: [num_layers, ...]}) or None. ``patches``:
    {blocks.* hook: (value [num_layers, ...], mask [num_layers, batch, seq])}. ``capture`` (validated names),
    ``callbacks``, ``expert_impl``, ``unroll``, ``attn_spec``, ``length``, ``attn_impl``: as in :func:`forward`.
    ``kv``: a :class:`~grokviz.model.kvcache.KVCache` (all layers run; the chunk is written into it).

    Consecutive layers of one kind (MoE or dense MLP) form one scan; routing hooks come from MoE layers only
    and, when the run has dense layers, are stacked over its MoE layers (the layout says which).
    """
    capture, callbacks, patches = select(capture), callbacks or {}, patches or {}
    if isinstance(start_layer, np.integer):
        start_layer = int(start_layer)
    _check_blocks_args(cfg, expert_impl, patches, start_layer, stop_layer, capture, callbacks)
    block_spec = with_impl(attn_spec, attn_impl)
    if kv is not None and (start_layer != 0 or stop_layer not in (None, cfg.num_layers)):
        raise ValueError("a KV cache needs every layer run (start_layer 0, stop_layer None)")
    stop = cfg.num_layers if stop_layer is None else stop_layer
    static = isinstance(start_layer, int)
    real = is_real(tokens, cfg.pad_token)
    masks = build_masks(tokens, cfg, length, kv)
    layers = range(start_layer if static else 0, stop)
    maps = (MapBuffers.plan(capture, attn_spec, cfg, patches, callbacks, layers, recompute_ok=kv is None)
            if static else None)
    body_capture = capture if maps is None else maps.body_capture(capture)
    sliding_of = jnp.asarray(cfg.layer_is_sliding)
    # every layer's pattern under the fused kernel: one buffer in the carry that each layer's kernel writes into
    inplace = INPLACE_MAP if (static and maps is None and kv is None and INPLACE_MAP in capture
                              and INPLACE_MAP not in patches and INPLACE_MAP not in callbacks
                              and (attn_spec is None or attn_spec.heads is None)
                              and block_spec.impl == "fused") else None

    def run_layer(p, h, iv, pt, layer, moe, kv_l, bufs):
        targets = {} if inplace is None else {inplace: (bufs[inplace], layer - layers.start)}
        point = Point(body_capture, prefix="blocks.", patches=pt, callbacks=callbacks, layer=layer, targets=targets)
        step = None if kv is None else kv.step
        return block(p, h, real, _layer_mask(masks, cfg, sliding_of[layer]), cfg, point, iv, expert_impl, block_spec,
                     moe=moe, positions=masks.positions, kv=None if kv is None else (*kv_l, step))

    def make_body(moe):
        def body(carry, xs):
            h, bufs = carry
            p, iv, pt, layer, kv_l = xs
            if not static:
                skip = lambda h: h  # noqa: E731
                return (jax.lax.cond(layer >= start_layer,
                                     lambda h: run_layer(p, h, iv, pt, layer, moe, kv_l, bufs)[0], skip, h),
                        bufs), ({}, None)
            out = run_layer(p, h, iv, pt, layer, moe, kv_l, bufs)
            h, caps = out[0], out[1]
            if inplace is not None:  # the layer wrote its slot (the kernel) or gave its value (any other path)
                value = caps.pop(inplace)
                bufs = {inplace: value if value.ndim == bufs[inplace].ndim else
                        jax.lax.dynamic_update_index_in_dim(bufs[inplace], value, layer - layers.start, 0)}
            caps = {k: select_heads(k, v, attn_spec) for k, v in caps.items()}
            if maps is not None:
                bufs = maps.write(bufs, caps, capture, layer)
            return (h, bufs), (caps, None if kv is None else out[2])
        return body

    bufs = {} if maps is None else maps.allocate(cfg, *tokens.shape, attn_spec, None if kv is None else kv.size)
    if inplace is not None:
        b, t = tokens.shape
        bufs = {inplace: maps_buffer((len(layers), b, cfg.num_q_heads, t, t))}  # each layer writes its slot
    per_seg, kv_out = [], []
    split = isinstance(params["blocks"], tuple)  # per-layer params (split_layers)
    split_kv = kv is not None and isinstance(kv.k, tuple)  # per-layer cache buffers (KVCache.split)
    if (split or split_kv) and not unroll:
        raise ValueError("per-layer params (split_layers) or cache buffers (KVCache.split) need unroll=True")
    for a, b, moe in segments(cfg, layers):
        xs = (params["blocks"][a:b] if split else _segment_params(params["blocks"], cfg, a, b, moe),
              None if interventions is None else jax.tree_util.tree_map(lambda x, a=a, b=b: x[a:b], interventions),
              jax.tree_util.tree_map(lambda x, a=a, b=b: x[a:b], patches), jnp.arange(a, b),
              None if kv is None else (kv.k[a:b], kv.v[a:b]))  # tuples of layers when split_kv
        body = make_body(moe)
        if unroll:
            outs = []
            for i in range(b - a):
                xs_i = jax.tree_util.tree_map(lambda x, i=i: x[i], xs[1:4])
                kv_i = None if kv is None else (
                    (xs[4][0][i], xs[4][1][i]) if split_kv else jax.tree_util.tree_map(lambda x, i=i: x[i], xs[4]))
                (h, bufs), y = body((h, bufs), ((xs[0][i] if split else
                                                 jax.tree_util.tree_map(lambda x, i=i: x[i], xs[0])),) + xs_i + (kv_i,))
                outs.append(y)
            caps = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *[y[0] for y in outs]) if outs and outs[0][0] else {}
            if kv is None:
                ys = (caps, None)
            elif split_kv:
                ys = (caps, (tuple(y[1][0] for y in outs), tuple(y[1][1] for y in outs)))
            else:
                ys = (caps, jax.tree_util.tree_map(lambda *v: jnp.stack(v), *[y[1] for y in outs]))
        else:
            (h, bufs), ys = jax.lax.scan(body, (h, bufs), xs)
        per_seg.append((a, b, moe, ys[0]))
        if kv is not None:
            kv_out.append(ys[1])
    stacked, layout = _join_segments(per_seg, cfg)
    if inplace is not None:
        stacked[inplace] = bufs[inplace]
    if maps is not None:
        stacked = maps.finish(bufs, stacked, params, masks, cfg, block_spec)
    layout = {**cache_layout(capture, attn_spec, cfg, layers), **layout}
    new_kv = None
    if kv is not None:
        if split_kv:
            k_new, v_new = sum((c[0] for c in kv_out), ()), sum((c[1] for c in kv_out), ())
        else:
            k_new = jnp.concatenate([c[0] for c in kv_out]) if len(kv_out) > 1 else kv_out[0][0]
            v_new = jnp.concatenate([c[1] for c in kv_out]) if len(kv_out) > 1 else kv_out[0][1]
        new_kv = KVCache(k_new, v_new, *masks.kv_meta)
    return Blocks(h, stacked, layout, new_kv)


def _join_segments(per_seg, cfg) -> tuple[dict, dict]:
    """Captures of the segments concatenated over their layers; routing hooks over the MoE layers only (and then
    a layout entry naming them when the run also has dense layers)."""
    if len(per_seg) == 1:
        return dict(per_seg[0][3]), {}
    names = {n for *_, caps in per_seg for n in caps}
    stacked, layout = {}, {}
    for n in sorted(names):
        parts = [(range(a, b), caps[n]) for a, b, _, caps in per_seg if n in caps]
        stacked[n] = jnp.concatenate([v for _, v in parts])
        kept = tuple(i for r, _ in parts for i in r)
        if n in _MOE_ONLY and len(kept) != sum(b - a for a, b, *_ in per_seg):
            layout[n] = (kept, None)
    return stacked, layout


#: hooks recorded only at MoE layers
_MOE_ONLY = frozenset(ROUTING_HOOKS) | {"blocks.moe.expert_out", "blocks.moe.expert_outputs_all",
                                        "blocks.moe.shared_out", "blocks.moe.shared_gate"}


def forward(params, tokens, cfg, *, capture=frozenset(), interventions=None, expert_impl="sparse",
            unroll=False, callbacks=None, attn_spec: AttentionSpec | None = None, length=None,
            kv: KVCache | None = None, attn_impl="auto") -> Output:
    """Pure forward pass. tokens: int [batch, seq] (pad id = padding, masked as keys only).

    ``capture``: hook names or globs, validated (see :func:`grokviz.hooks.select`; the capture contract is in
    :mod:`grokviz.hooks`). ``interventions``: a :class:`grokviz.interventions.Interventions` (or None).
    ``expert_impl``: "sparse" (fast) or "dense" (reference). ``unroll``: Python loop instead of lax.scan.
    ``attn_impl``: "auto" (default: "fused" where the compiled CPU kernel of :mod:`grokviz.kernels` is
    available, else "tiled"), "fused", "tiled" (query x key tiles with an online softmax, :mod:`grokviz.model.tiled`)
    or "reference" (the full score tensor); logits and scores maps and KV-cache decode steps use the reference form.
    ``callbacks``: {hook name: fn(value, layer) -> value}; static (changing them recompiles).
    ``attn_spec``: :class:`grokviz.hooks.AttentionSpec` — which layers/heads keep full attention maps, and the
    parameters of the reduced attention hooks. Maps kept for selected layers only are stacked over those
    layers (in increasing order) and never materialised for the others; ``Output.layout`` says which.
    ``length``: true length when ``tokens`` were right-padded to a bucket (see :func:`attention_mask`).
    ``kv``: a :class:`~grokviz.model.kvcache.KVCache`; ``tokens`` are then the next chunk (a prompt to prefill, or
    one token per row to decode), written into the cache, and ``Output.kv`` is the updated cache.
    """
    capture = select(capture)
    callbacks = callbacks or {}
    select(list(callbacks))  # unknown names raise, as for capture
    iv_layers, patches = (None, {}) if interventions is None else interventions.split()
    top = Point(capture, patches={k: v for k, v in patches.items() if not k.startswith("blocks.")},
                callbacks=callbacks)
    h = embed(params, tokens, cfg, top)
    blocks = run_blocks(params, h, tokens, cfg, length=length, capture=capture, interventions=iv_layers,
                        patches={k: v for k, v in patches.items() if k.startswith("blocks.")},
                        callbacks=callbacks, expert_impl=expert_impl, unroll=unroll, attn_spec=attn_spec, kv=kv,
                        attn_impl=attn_impl)
    logits = unembed(params, blocks.h, cfg, top)
    return Output(logits=logits, cache={**top.values, **blocks.cache}, layout=tuple(blocks.layout.items()),
                  kv=blocks.kv)
