"""The fused CPU attention kernel (``attention.cc``) as a JAX function: :func:`attend_fused`.

The same computation as the reference form in :mod:`grokviz.model.attention` (scaled logits, soft cap, the
layer's ``allowed`` mask, sinks, rows with no allowed key uniform over the keys that are not bucket padding),
to fp32 rounding, in one pass over key tiles with an online softmax; key tiles whose mask tile is entirely
false are skipped. Queries may be fewer than keys (a chunk over a KV-cache buffer: the mask says which slots
each query sees). bf16 inputs are computed in fp32. Gradients are those of the pure-JAX forms
(:func:`grokviz.model.tiled.attend_tiled` without a cache, the reference form with one or with the pattern),
through ``jax.custom_vjp``; under ``vmap`` the kernel runs once per batch element (``vmap_method="sequential"``).
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

#: query rows and keys per tile of the kernel (chosen by bench/bench_attention.py)
TILE_Q = 64
TILE_K = 128
MASK_VALUE = -1e30  # grokviz.model.layers.MASK_VALUE (not imported: the model imports this module)


def _kernel(qg, k, v, allowed, valid, sinks, *into, mult, cap, has_sinks, pattern, tq, tk):
    """The FFI call: o (and the pattern [b h t S], or with ``into`` = (maps [n b h t S], slot) the maps buffer with
    the pattern written into ``maps[slot]``, aliased so that XLA updates it in place)."""
    b, kvh, g, t, d = qg.shape
    shapes = [jax.ShapeDtypeStruct((b, t, kvh, g, d), jnp.float32)]
    attrs = dict(mult=np.float32(mult), cap=np.float32(cap or 0.0), has_sinks=np.int64(has_sinks),
                 tq=np.int64(tq), tk=np.int64(tk))
    if into:
        shapes.append(jax.ShapeDtypeStruct(into[0].shape, jnp.float32))
        call = jax.ffi.ffi_call("grokviz_attention_into", tuple(shapes), input_output_aliases={6: 1},
                                vmap_method="sequential")
        return call(qg, k, v, allowed, valid, sinks, *into, **attrs)
    if pattern:
        shapes.append(jax.ShapeDtypeStruct((b, kvh * g, t, k.shape[1]), jnp.float32))
    call = jax.ffi.ffi_call("grokviz_attention_pattern" if pattern else "grokviz_attention", tuple(shapes),
                            vmap_method="sequential")
    return call(qg, k, v, allowed, valid, sinks, **attrs)


def _reference(qg, k, v, allowed, fill, sinks, cfg, pattern):
    """The reference form's (o [b t kv g d], pattern [b h t s] or None) in fp32 (for the backward pass)."""
    A = importlib.import_module("grokviz.model.attention")
    _, _, pat = A._probs(qg, k, allowed[:, None], fill, cfg, sinks)
    o = jnp.einsum("bhgts,bshd->bthgd", pat, v)
    if not pattern:
        return o
    b, kvh, g, t, s = pat.shape
    return o, pat.reshape(b, kvh * g, t, s)


def _tiled(qg, k, v, allowed, fill, sinks, cfg):
    from ..model.tiled import attend_tiled

    return attend_tiled(qg, k, v, (allowed[:, None], fill), cfg, jnp.float32, sinks)[0]


def maps_buffer(shape):
    """An fp32 buffer of ``shape`` for :func:`attend_fused`'s ``into``, left unwritten by the kernel (fill every
    slot before reading it: a run's every-layer capture writes each slot once)."""
    return jax.ffi.ffi_call("grokviz_uninit", jax.ShapeDtypeStruct(tuple(shape), jnp.float32))()


def attend_fused(qg, k, v, mask, cfg, dt, sinks=None, *, pattern=False, into=None, tq=None, tk=None):
    """Attention of queries qg [b kv g t d] over keys k, v [b S kv d] -> o [b t kv g d] in ``dt`` (and, with
    ``pattern``, the normalised weights [b kv*g t S] in fp32, zeros where the reference has them).

    ``mask``: (allowed [b, 1, t, S] bool, fill scalar or [S]) as :func:`grokviz.model.attention.attention_mask`
    or :func:`grokviz.model.transformer.build_masks` builds it; ``sinks`` [kv g] or None. ``into``: (maps
    [n, b, kv*g, t, S] fp32, slot int32 scalar): the weights are written into ``maps[slot]`` in place instead of a
    new array, and (o, the updated maps) is returned (a run's every-layer capture, with no copy per layer). The
    kernel must be loaded (:func:`grokviz.kernels.available`)."""
    from . import available, reason

    if not available():
        raise RuntimeError(f"the fused attention kernel is unavailable: {reason()}")
    allowed, fill = mask
    b, kvh, g, t, d = qg.shape
    s = k.shape[1]
    if k.shape != (b, s, kvh, d) or v.shape != k.shape:
        raise ValueError(f"attend_fused: keys {k.shape} / values {v.shape} do not fit queries {qg.shape}")
    if into is not None:
        maps, slot = into
        if maps.ndim != 5 or tuple(maps.shape[1:]) != (b, kvh * g, t, s) or maps.dtype != jnp.float32:
            raise ValueError(f"attend_fused: maps {maps.dtype}{list(maps.shape)} must be float32 [n, {b}, "
                             f"{kvh * g}, {t}, {s}]")
        into = (maps, jnp.asarray(slot, jnp.int32).reshape(()))
    allowed = jnp.broadcast_to(allowed, (b, 1, t, s))[:, 0]
    fill = jnp.broadcast_to(jnp.asarray(fill, jnp.float32), (s,))
    valid = fill == MASK_VALUE
    f32 = jnp.float32
    has_sinks = sinks is not None
    sinks_arr = (sinks.astype(f32) if has_sinks else jnp.zeros((kvh, g), f32)).reshape(kvh * g)
    pattern = pattern or into is not None
    statics = dict(mult=float(cfg.attn_logit_multiplier), cap=cfg.attn_softcap, has_sinks=has_sinks,
                   pattern=pattern, tq=int(tq or TILE_Q), tk=int(tk or TILE_K))
    use_tiled_bwd = not pattern and s == t
    maps_in = () if into is None else (into[0],)  # a pytree argument: () or (maps,)
    slot = jnp.int32(0) if into is None else into[1]

    @jax.custom_vjp
    def core(qg, k, v, sinks_arr, maps, slot, allowed, valid, fill):
        extra = () if not maps else (maps[0], slot)
        out = _kernel(qg, k, v, allowed, valid, sinks_arr, *extra, **statics)
        return out[0] if not pattern else tuple(out)

    def pure(qg, k, v, sinks_arr, maps, slot, allowed, fill):
        sk = sinks_arr.reshape(kvh, g) if has_sinks else None
        if use_tiled_bwd:
            return _tiled(qg, k, v, allowed, fill, sk, cfg)
        out = _reference(qg, k, v, allowed, fill, sk, cfg, pattern)
        if maps:
            return out[0], jax.lax.dynamic_update_index_in_dim(maps[0], out[1], slot, 0)
        return out

    def fwd(qg, k, v, sinks_arr, maps, slot, allowed, valid, fill):
        return (core(qg, k, v, sinks_arr, maps, slot, allowed, valid, fill),
                (qg, k, v, sinks_arr, maps, slot, allowed, fill))

    def bwd(res, ct):
        qg, k, v, sinks_arr, maps, slot, allowed, fill = res
        _, vjp = jax.vjp(lambda *a: pure(*a, slot, allowed, fill), qg, k, v, sinks_arr, maps)
        return (*vjp(ct), None, None, None, None)  # no cotangent for the slot and the mask

    core.defvjp(fwd, bwd)
    out = core(qg.astype(f32), k.astype(f32), v.astype(f32), sinks_arr, maps_in, slot, allowed, valid, fill)
    if pattern:
        return out[0].astype(dt), out[1]
    return out.astype(dt)
