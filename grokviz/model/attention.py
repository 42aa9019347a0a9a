"""Grouped-query attention with RoPE, logit multiplier, 30*tanh soft cap and -1e30 masking (spec §3.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from ..hooks import AttentionSpec
from ..params import dense
from .layers import MASK_VALUE, rope, softcap


def attention_mask(tokens, pad_token, length=None):
    """(allowed, fill): allowed [batch, 1, seq, kv_seq] bool — key is real (token > pad) and causal
    (kv_seq <= seq); queries are not masked. ``fill`` is the value of masked logits: -1e30 as in the reference.

    ``length`` (optional, traced): the true sequence length when the tokens were right-padded to a bucket.
    Keys at or beyond it get -2e30, so a query whose keys are all masked (left padding) is uniform over the
    first ``length`` keys exactly as in an unpadded run, while every other row is unchanged.
    """
    real = tokens > pad_token
    t = tokens.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    allowed = real[:, None, None, :] & causal[None, None]
    if length is None:
        return allowed, jnp.float32(MASK_VALUE)
    fill = jnp.where(jnp.arange(t) < length, jnp.float32(MASK_VALUE), jnp.float32(2 * MASK_VALUE))
    return allowed, fill


def _rope_point(point, name, x, positions, base):
    """RoPE, with the captured copy computed on a separate branch.

    XLA fuses RoPE into the logits einsum; storing the same value as a capture changes that fusion and moved
    the logits by ~6e-7. Capturing from a copy behind an optimisation barrier leaves the main computation
    exactly as without capture (so logits stay bit-identical); the captured value equals it to fp32 rounding.
    A patch or callback on this hook replaces the value on the main path.
    """
    if point.patched(name):
        return point(name, rope(x, positions, base))
    if point.wants(name):
        point(name, rope(jax.lax.optimization_barrier(x), positions, base))
    return rope(x, positions, base)


def _reductions(pattern, point, spec):
    """Reduced summaries of the pattern [b, head, t, s], computed on the fly (memory ~ b*head*t)."""
    if point.wants("attn.entropy"):
        point("attn.entropy", -jnp.sum(jnp.where(pattern > 0, pattern * jnp.log(pattern), 0.0), axis=-1))
    if point.wants("attn.pattern_at"):
        point("attn.pattern_at", pattern[:, :, jnp.asarray(spec.queries), :])
    if point.wants("attn.top_keys") or point.wants("attn.top_key_weights"):
        weights, keys = jax.lax.top_k(pattern, min(spec.top_keys, pattern.shape[-1]))
        point("attn.top_keys", keys.astype(jnp.int32))
        point("attn.top_key_weights", weights)


def attention(p, x, mask, cfg, point, head_scale=None, spec=None):
    """x: [batch, seq, d_model] (already pre-normed) -> [batch, seq, d_model]; ``point`` names activations."""
    dt = x.dtype
    t = x.shape[1]
    positions = jnp.arange(t)
    q = rearrange(x @ dense(p["w_q"], dt), "b t (h d) -> b t h d", d=cfg.head_dim)
    k = rearrange(x @ dense(p["w_k"], dt), "b t (h d) -> b t h d", d=cfg.head_dim)
    v = rearrange(x @ dense(p["w_v"], dt), "b t (h d) -> b t h d", d=cfg.head_dim)
    q = _rope_point(point, "attn.q", q, positions, cfg.rope_base)
    k = _rope_point(point, "attn.k", k, positions, cfg.rope_base)
    v = point("attn.v", v)
    # query head j = kv_head * G + g uses kv head j // G (contiguous groups)
    qg = rearrange(q, "b t (kv g) d -> b kv g t d", g=cfg.group_size)
    logits = jnp.einsum("bhgtd,bshd->bhgts", qg, k).astype(jnp.float32) * cfg.attn_logit_multiplier
    if point.wants("attn.logits"):
        point("attn.logits", rearrange(logits, "b kv g t s -> b (kv g) t s"))
    scores = softcap(logits, cfg.attn_softcap)
    if point.wants("attn.scores"):
        point("attn.scores", rearrange(scores, "b kv g t s -> b (kv g) t s"))
    allowed, fill = mask
    scores = jnp.where(allowed[:, :, None], scores, fill)
    pattern = jax.nn.softmax(scores, axis=-1)
    reduce = any(point.wants(n) for n in ("attn.entropy", "attn.pattern_at", "attn.top_keys",
                                          "attn.top_key_weights"))
    if point.wants("attn.pattern") or point.patched("attn.pattern") or reduce:
        flat = point("attn.pattern", rearrange(pattern, "b kv g t s -> b (kv g) t s"))
        pattern = rearrange(flat, "b (kv g) t s -> b kv g t s", g=cfg.group_size)
        if reduce:
            _reductions(flat, point, spec or AttentionSpec())
    o = jnp.einsum("bhgts,bshd->bthgd", pattern.astype(dt), v)
    o = rearrange(o, "b t kv g d -> b t (kv g) d")
    if head_scale is not None:
        o = o * head_scale[:, None].astype(dt)
    o = point("attn.head_out", o)
    return rearrange(o, "b t h d -> b t (h d)") @ dense(p["w_o"], dt)
