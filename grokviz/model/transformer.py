"""The whole model: :func:`embed` -> :func:`run_blocks` (lax.scan of the block over stacked layers) ->
:func:`unembed` (final norm, tied unembedding, output multiplier). :func:`forward` is exactly these three; the
analysis code (patching, logit lens) calls the parts, e.g. to run the blocks from a given layer on."""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np

from ..config import is_real
from ..hooks import AttentionSpec, Point, select
from ..params import dense
from .attention import attention_mask
from .block import EXPERT_IMPLS, block
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


class Blocks(typing.NamedTuple):
    """What :func:`run_blocks` returns."""

    h: jax.Array   # the residual stream leaving the last layer run
    cache: dict    # blocks.* hook name -> [layers run (or selected layers), ...]
    layout: dict   # as Output.layout, for the hooks in ``cache``


def embed(params, tokens, cfg, point: Point | None = None):
    """tokens int [batch, seq] -> the residual stream into layer 0 (``embed.out``): embedding x multiplier.

    Shape and dtype are checked always, ids against the vocabulary when ``tokens`` are concrete (a gather would
    clamp an out-of-range id silently); inside ``jit`` the caller checks ids (``Model.run`` does)."""
    if jnp.ndim(tokens) != 2 or 0 in jnp.shape(tokens) or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"tokens must be integer ids of shape [batch, seq] with seq > 0, got shape "
                         f"{tuple(jnp.shape(tokens))} and dtype {jnp.result_type(tokens)}")
    if not isinstance(tokens, jax.core.Tracer):
        ids = np.asarray(tokens)
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    h = dense(params["embed"], jnp.float32)[tokens] * cfg.embedding_multiplier
    return h if point is None else point("embed.out", h)


def unembed(params, h, cfg, point: Point | None = None):
    """h [..., d_model] -> logits [..., vocab]: final rms_norm (``final_norm.out``), tied unembedding, output
    multiplier (``unembed.logits``). The readout of the model, and of the logit lens at any layer."""
    if jnp.ndim(h) < 1 or jnp.shape(h)[-1] != cfg.d_model:
        raise ValueError(f"unembed: h must have shape [..., d_model={cfg.d_model}], got {tuple(jnp.shape(h))}")
    point = point or Point()
    hf = point("final_norm.out", rms_norm(h, params["final_norm"], cfg.rms_eps))
    logits = jnp.einsum("...d,vd->...v", hf, dense(params["embed"], hf.dtype)) * cfg.output_multiplier
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


def run_blocks(params, h, tokens, cfg, *, start_layer=0, stop_layer=None, length=None, capture=frozenset(),
               interventions=None, patches=None, callbacks=None, expert_impl="sparse", unroll=False,
               attn_spec: AttentionSpec | None = None) -> Blocks:
    """Run layers ``start_layer .. stop_layer - 1`` on the residual stream ``h`` [batch, seq, d_model], which is
    ``resid_pre`` of ``start_layer``. ``tokens`` (int [batch, seq]) give padding and the attention mask.

    ``start_layer``: a Python int (only those layers are scanned; captures have one entry per layer run) or a
    traced int (every layer is scanned and those before it are skipped by ``lax.cond``, so all starts share one
    compiled program; no capture or callbacks then). ``interventions``: the per-layer arrays of
    :meth:`grokviz.interventions.Interventions.split` ({field: [num_layers, ...]}) or None. ``patches``:
    {blocks.* hook: (value [num_layers, ...], mask [num_layers, batch, seq])}. ``capture`` (validated names),
    ``callbacks``, ``expert_impl``, ``unroll``, ``attn_spec``, ``length``: as in :func:`forward`.
    """
    capture, callbacks, patches = select(capture), callbacks or {}, patches or {}
    if isinstance(start_layer, np.integer):
        start_layer = int(start_layer)
    _check_blocks_args(cfg, expert_impl, patches, start_layer, stop_layer, capture, callbacks)
    stop = cfg.num_layers if stop_layer is None else stop_layer
    static = isinstance(start_layer, int)
    real = is_real(tokens, cfg.pad_token)
    mask = attention_mask(tokens, cfg.pad_token, length)
    layers = range(start_layer if static else 0, stop)
    maps = MapBuffers.plan(capture, attn_spec, cfg, patches, callbacks, layers) if static else None
    body_capture = capture if maps is None else maps.body_capture(capture)

    def run_layer(p, h, iv, pt, layer):
        point = Point(body_capture, prefix="blocks.", patches=pt, callbacks=callbacks, layer=layer)
        return block(p, h, real, mask, cfg, point, iv, expert_impl, attn_spec)

    def body(carry, xs):
        h, bufs = carry
        p, iv, pt, layer = xs
        if not static:
            skip = lambda h: h  # noqa: E731
            return (jax.lax.cond(layer >= start_layer, lambda h: run_layer(p, h, iv, pt, layer)[0], skip, h),
                    bufs), {}
        h, caps = run_layer(p, h, iv, pt, layer)
        caps = {k: select_heads(k, v, attn_spec) for k, v in caps.items()}
        if maps is not None:
            bufs = maps.write(bufs, caps, capture, layer)
        return (h, bufs), caps

    xs = (params["blocks"], interventions, patches, jnp.arange(cfg.num_layers))
    if layers != range(cfg.num_layers):
        xs = jax.tree_util.tree_map(lambda a: a[layers.start:layers.stop], xs)
    bufs = {} if maps is None else maps.allocate(cfg, *tokens.shape, attn_spec)
    if unroll:
        per_layer = []
        for i in range(len(layers)):
            (h, bufs), c = body((h, bufs), jax.tree_util.tree_map(lambda a, i=i: a[i], xs))
            per_layer.append(c)
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_layer) if per_layer and per_layer[0] else {}
    else:
        (h, bufs), stacked = jax.lax.scan(body, (h, bufs), xs)
    if maps is not None:
        stacked = maps.finish(bufs, stacked, params, mask, cfg, attn_spec)
    return Blocks(h, stacked, cache_layout(capture, attn_spec, cfg, layers))


def forward(params, tokens, cfg, *, capture=frozenset(), interventions=None, expert_impl="sparse",
            unroll=False, callbacks=None, attn_spec: AttentionSpec | None = None, length=None) -> Output:
    """Pure forward pass. tokens: int [batch, seq] (pad id = padding, masked as keys only).

    ``capture``: hook names or globs, validated (see :func:`grokviz.hooks.select`; the capture contract is in
    :mod:`grokviz.hooks`). ``interventions``: a :class:`grokviz.interventions.Interventions` (or None).
    ``expert_impl``: "sparse" (fast) or "dense" (reference). ``unroll``: Python loop instead of lax.scan.
    ``callbacks``: {hook name: fn(value, layer) -> value}; static (changing them recompiles).
    ``attn_spec``: :class:`grokviz.hooks.AttentionSpec` — which layers/heads keep full attention maps, and the
    parameters of the reduced attention hooks. Maps kept for selected layers only are stacked over those
    layers (in increasing order) and never materialised for the others; ``Output.layout`` says which.
    ``length``: true length when ``tokens`` were right-padded to a bucket (see :func:`attention_mask`).
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
                        callbacks=callbacks, expert_impl=expert_impl, unroll=unroll, attn_spec=attn_spec)
    logits = unembed(params, blocks.h, cfg, top)
    return Output(logits=logits, cache={**top.values, **blocks.cache}, layout=tuple(blocks.layout.items()))
