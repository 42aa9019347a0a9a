"""Tiled attention: query blocks x key blocks with an online softmax, so the score tiles stay in cache
(docs/grok1.md#attention; issue 17). The same computation as the straightforward form in
:mod:`grokviz.model.attention` (scaled logits, soft cap, masks with the reference's ``fill``, sinks, the
mean-of-values rows of left padding), to fp32 rounding; that form stays the reference.

One ``lax.scan`` walks the (query block, key block) pairs of the causal lower triangle in query-major order
(static index arrays, so it is differentiable and vmappable); tiles above the diagonal are never computed.
Each step forms one score tile [batch, kv_head, group * tq, tk], soft-caps and masks it (the mask tile is
sliced from the layer's ``allowed``, so sliding windows and padding are exactly the reference's), and updates
the running max ``m``, sum ``l`` and weighted values of its query block; the normalised block is written into
the output at every step (the last write, at the diagonal, is the result). The reduced summaries
``attn.entropy`` and ``attn.top_keys`` / ``attn.top_key_weights`` are carried online too.

Rows whose keys are all masked (left padding) are uniform over the keys that are not bucket padding in the
reference (every key there holds the same ``fill``); they are set to exactly that, as the chunked path does.
With sinks such a row is 0 in the reference and here alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .layers import MASK_VALUE, softcap

#: query and key tile sizes (chosen by bench/bench_attention.py; see tile_sizes)
TILE_Q = 128
TILE_K = 128
_NEG = -3.0e38  # top-keys selection value of a masked key: below every score, above the -inf of empty slots


def tile_sizes(t: int, tq: int | None = None, tk: int | None = None) -> tuple[int, int]:
    """(tq, tk) for a sequence of ``t``: the defaults, never longer than the sequence."""
    return min(tq or TILE_Q, t), min(tk or TILE_K, t)


def tile_pairs(t: int, tq: int, tk: int) -> tuple[np.ndarray, np.ndarray]:
    """Static (query block, key block) indices of the tiles at or below the causal diagonal, query-major."""
    nq, nk = -(-t // tq), -(-t // tk)
    qi, ki = [], []
    for i in range(nq):
        last = min(nk, -(-min((i + 1) * tq, t) // tk))  # key blocks holding a key <= the block's last query
        qi += [i] * last
        ki += list(range(last))
    return np.asarray(qi, np.int32), np.asarray(ki, np.int32)


def _pad_axis(x, axis, size, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def attend_tiled(qg, k, v, mask, cfg, dt, sinks=None, *, want=frozenset(), top_keys=4, tq=None, tk=None):
    """Causal attention of queries qg [b kv g t d] over keys k, v [b t kv d] (no KV cache) -> (o [b t kv g d],
    summaries {name: value}) for the reduced hooks named in ``want`` (``attn.entropy`` [b h t],
    ``attn.top_keys`` / ``attn.top_key_weights`` [b h t min(top_keys, t)]). ``mask``: (allowed [b 1 t t], fill
    scalar or [t]) as built by :func:`grokviz.model.attention.attention_mask`; ``sinks`` [kv g] or None."""
    allowed, fill = mask
    b, kvh, g, t, d = qg.shape
    tq, tk = tile_sizes(t, tq, tk)
    nq, nk = -(-t // tq), -(-t // tk)
    Tq, Tk = nq * tq, nk * tk
    rows = g * tq
    f32 = jnp.float32
    want_ent = "attn.entropy" in want
    want_top = "attn.top_keys" in want or "attn.top_key_weights" in want
    kk = min(top_keys, t)
    if want_top and kk > tk:
        raise ValueError(f"top_keys={top_keys} exceeds the key tile {tk} of the tiled attention")

    # blocked operands: Q [nq b kv g*tq d], K, V [nk b kv tk d], allowed [b Tq Tk], fill [nk tk]
    qb = _pad_axis(qg, 3, Tq).reshape(b, kvh, g, nq, tq, d).transpose(3, 0, 1, 2, 4, 5).reshape(nq, b, kvh, rows, d)
    kb = _pad_axis(k, 1, Tk).reshape(b, nk, tk, kvh, d).transpose(1, 0, 3, 2, 4)
    vb = _pad_axis(v, 1, Tk).reshape(b, nk, tk, kvh, d).transpose(1, 0, 3, 2, 4)
    allow = _pad_axis(_pad_axis(allowed[:, 0], 1, Tq, False), 2, Tk, False)
    fill_t = jnp.broadcast_to(jnp.asarray(fill, f32), (t,))
    fillb = _pad_axis(fill_t, 0, Tk, MASK_VALUE).reshape(nk, tk)
    if sinks is None:
        m0 = jnp.full((b, kvh, rows), jnp.finfo(f32).min, f32)
    else:
        m0 = jnp.broadcast_to(jnp.repeat(sinks.astype(f32), tq, axis=1)[None], (b, kvh, rows))
    init = {"m": m0, "l": jnp.zeros((b, kvh, rows), f32), "acc": jnp.zeros((b, kvh, rows, d), f32),
            "any": jnp.zeros((b, tq), bool)}
    if want_ent:
        init["ent"] = jnp.zeros((b, kvh, rows), f32)
    if want_top:
        init["top_v"] = jnp.full((b, kvh, rows, kk), -jnp.inf, f32)
        init["top_i"] = jnp.zeros((b, kvh, rows, kk), jnp.int32)
    outs = {"o": jnp.zeros((nq, b, kvh, rows, d), f32), "any": jnp.zeros((nq, b, tq), bool)}
    for name in init:
        if name not in ("acc", "any"):
            outs[name] = jnp.zeros((nq,) + init[name].shape, init[name].dtype)

    def step(carry, xs):
        outs, c = carry
        qi, ki = xs
        c = jax.tree_util.tree_map(lambda a, z: jnp.where(ki == 0, z, a), c, init)
        s = jnp.einsum("bhqd,bhkd->bhqk", qb[qi], kb[ki]).astype(f32) * cfg.attn_logit_multiplier
        if cfg.attn_softcap is not None:
            s = softcap(s, cfg.attn_softcap)
        a = jax.lax.dynamic_slice(allow, (0, qi * tq, ki * tk), (b, tq, tk))
        s5 = s.reshape(b, kvh, g, tq, tk)
        masked = jnp.where(a[:, None, None], s5, fillb[ki]).reshape(b, kvh, rows, tk)
        m = jnp.maximum(c["m"], jnp.max(masked, axis=-1))
        alpha = jnp.exp(c["m"] - m)
        p = jnp.exp(masked - m[..., None])
        new = {"m": m, "l": c["l"] * alpha + jnp.sum(p, axis=-1),
               "acc": c["acc"] * alpha[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(dt), vb[ki]).astype(f32),
               "any": c["any"] | jnp.any(a, axis=-1)}
        if want_ent:  # sum over keys of e^(s - m) (s - m), rescaled to the new max
            new["ent"] = alpha * (c["ent"] + c["l"] * (c["m"] - m)) + jnp.sum(p * (masked - m[..., None]), axis=-1)
        if want_top:
            sel = jnp.where(a[:, None, None], s5, _NEG).reshape(b, kvh, rows, tk)
            tv, ti = jax.lax.top_k(sel, kk)
            v_all = jnp.concatenate([c["top_v"], tv], axis=-1)
            i_all = jnp.concatenate([c["top_i"], ti.astype(jnp.int32) + ki * tk], axis=-1)
            new["top_v"], pos = jax.lax.top_k(v_all, kk)
            new["top_i"] = jnp.take_along_axis(i_all, pos, axis=-1)
        total = new["l"] if sinks is None else new["l"] + jnp.exp(m0 - m)
        w = {"o": new["acc"] / total[..., None], "any": new["any"]}
        w.update({n: new[n] for n in outs if n not in w})
        outs = {n: jax.lax.dynamic_update_index_in_dim(outs[n], w[n], qi, 0) for n in outs}
        return (outs, new), None

    qi, ki = tile_pairs(t, tq, tk)
    (outs, _), _ = jax.lax.scan(step, (outs, init), (jnp.asarray(qi), jnp.asarray(ki)))

    def unblock(x):  # [nq, b, kv, g*tq, ...] -> [b, kv*g, t, ...]
        x = x.reshape((nq, b, kvh, g, tq) + x.shape[4:])
        x = jnp.moveaxis(x, 0, 3).reshape((b, kvh * g, Tq) + x.shape[5:])
        return x[:, :, :t]

    o = jnp.moveaxis(unblock(outs["o"]), 2, 1).reshape(b, t, kvh, g, d)
    empty = ~jnp.moveaxis(outs["any"], 0, 1).reshape(b, Tq)[:, :t]  # [b, t]: query with no allowed key
    valid = fill_t == MASK_VALUE  # keys that are not bucket padding
    n_valid = jnp.sum(valid).astype(f32)
    if sinks is None:
        v_mean = jnp.sum(jnp.where(valid[None, :, None, None], v.astype(f32), 0.0), axis=1) / n_valid
        o = jnp.where(empty[:, :, None, None, None], v_mean[:, None, :, None, :], o)
    else:
        empty = jnp.zeros_like(empty)  # a row with no allowed key weighs every key 0, here as in the reference
    summaries = {}
    if want_ent or want_top:
        m, l = unblock(outs["m"]), unblock(outs["l"])
        total = l if sinks is None else l + jnp.exp(unblock(m0[None].repeat(nq, 0)) - m)
    if want_ent:
        ent = jnp.log(total) * (l / total) - unblock(outs["ent"]) / total
        summaries["attn.entropy"] = jnp.where(empty[:, None], jnp.log(n_valid), ent)
    if want_top:
        weights = jnp.exp(unblock(outs["top_v"]) - m[..., None]) / total[..., None]
        summaries["attn.top_key_weights"] = jnp.where(empty[:, None, :, None], 1.0 / n_valid, weights)
        summaries["attn.top_keys"] = unblock(outs["top_i"])
    return o.astype(dt), summaries
