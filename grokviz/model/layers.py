"""Small pure functions shared by the blocks (docs/grok1.md#rmsnorm, #attention, #moe)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -1e30  # the reference's masked-logit constant (not -inf: fully masked rows stay finite)


def rms_norm(x, scale, eps):
    """``scale * x / sqrt(mean(x**2) + eps)`` in fp32, scale used as is (not 1 + scale); output in x's dtype."""
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(ms + eps)
    return (scale.astype(jnp.float32) * y).astype(x.dtype)


def rope_frequencies(cfg, dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq [dim/2] float32, attention factor) of the config's RoPE variant, computed on the host.

    ``default``: ``1 / base**(2i/dim)``. ``yarn`` (YaRN, Peng et al. 2023, arXiv:2309.00071, as transformers'
    ``rope_type="yarn"`` computes it for gpt-oss): per frequency a blend of the original (extrapolated) and the
    ``factor``-interpolated frequency, with a linear ramp between the dimensions whose wavelength makes
    ``beta_fast`` and ``beta_slow`` rotations over ``original_max_position_embeddings`` (ramp ends floored/ceiled
    when ``truncate``); cos and sin are multiplied by the attention factor ``0.1 ln(factor) + 1`` (or the
    config's own)."""
    base = cfg.rope_base
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
    if cfg.rope_type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
    factor, orig = cfg.rope_factor, cfg.rope_original_max
    attention_factor = cfg.rope_attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = np.float32(1.0) - ramp.astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (np.float32(1.0) - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope(x, positions, base, cfg=None):
    """Rotate-half RoPE over all ``head_dim`` features (dim i pairs with i + head_dim/2), computed in fp32.

    x: [batch, seq, head, head_dim]; positions: [seq] or [batch, seq]. ``cfg`` (optional) selects the RoPE
    variant (:func:`rope_frequencies`); without it, default RoPE with ``base``.
    """
    dim = x.shape[-1]
    if cfg is None or cfg.rope_type == "default":
        inv_freq, scale = 1.0 / (base ** (jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim)), 1.0
    else:
        inv_freq, scale = rope_frequencies(cfg, dim)
        inv_freq = jnp.asarray(inv_freq)
    pos = jnp.asarray(positions, jnp.float32)
    phase = pos[..., None] * inv_freq  # [.., seq, dim/2]
    phase = jnp.concatenate([phase, phase], axis=-1)
    if phase.ndim == 2:
        phase = phase[None]
    cos, sin = jnp.cos(phase)[:, :, None, :], jnp.sin(phase)[:, :, None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
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


def gated_ffn(gate, up, cfg):
    """The gated expert/MLP nonlinearity of the config, from the two input projections ``gate`` and ``up``.

    ``gelu_tanh`` (Grok): gelu(gate) * up. ``silu`` (Mixtral, OLMoE, Qwen, Granite): silu(gate) * up.
    ``swiglu_clamped`` (gpt-oss): gate clipped above at ``limit``, up clipped to [-limit, limit], then
    ``(up + 1) * gate * sigmoid(alpha * gate)``.
    """
    if cfg.expert_act == "gelu_tanh":
        return gelu_tanh(gate) * up
    if cfg.expert_act == "silu":
        return jax.nn.silu(gate) * up
    limit = cfg.swiglu_limit
    g = jnp.minimum(gate, limit)
    u = jnp.clip(up, -limit, limit)
    return (u + 1) * (g * jax.nn.sigmoid(g * cfg.swiglu_alpha))
