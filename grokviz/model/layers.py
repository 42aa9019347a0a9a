"""Small pure functions shared by the blocks (docs/grok1.md#rmsnorm, #attention, #moe)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # the reference's masked-logit constant (not -inf: fully masked rows stay finite)


def rms_norm(x, scale, eps):
    """``scale * x / sqrt(mean(x**2) + eps)`` in fp32, scale used as is (not 1 + scale); output in x's dtype."""
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(ms + eps)
    return (scale.astype(jnp.float32) * y).astype(x.dtype)


def rope(x, positions, base):
    """Rotate-half RoPE over all ``head_dim`` features (dim i pairs with i + head_dim/2), computed in fp32.

    x: [batch, seq, head, head_dim]; positions: [seq] or [batch, seq].
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim))
    pos = jnp.asarray(positions, jnp.float32)
    phase = pos[..., None] * inv_freq  # [.., seq, dim/2]
    phase = jnp.concatenate([phase, phase], axis=-1)
    if phase.ndim == 2:
        phase = phase[None]
    cos, sin = jnp.cos(phase)[:, :, None, :], jnp.sin(phase)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def softcap(s, cap):
    """``cap * tanh(s / cap)``: Grok's attention-logit soft cap (cap = 30)."""
    return cap * jnp.tanh(s / cap)


def gelu_tanh(u):
    """The tanh approximation of GELU (JAX's default ``jax.nn.gelu``), as the reference uses."""
    return jax.nn.gelu(u, approximate=True)
