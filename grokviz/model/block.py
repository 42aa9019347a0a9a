"""One decoder block (docs/grok1.md#block, docs/families.md#block): attention then the MoE (or, at a dense layer,
an MLP), each added to the residual stream. Grok wraps both in sandwich norms; the other families pre-norm only.
The lax.scan body."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import moe as _moe
from .attention import attention
from .layers import rms_norm
from .moe import combine, dense_mlp, experts_dense, experts_sparse, route, shared_expert

EXPERT_IMPLS = {"dense": experts_dense, "sparse": experts_sparse}


def sublayer_write(value, norm_scale, cfg):
    """What a sublayer's output ``value`` adds to the residual stream: Grok's post-norm ``rms_norm(value,
    norm_scale)``; for the pre-norm families the output itself (``norm_scale`` unused), times the residual
    multiplier (Granite). The analysis code calls this to re-form a write."""
    if cfg.sandwich:
        value = rms_norm(value, norm_scale, cfg.rms_eps)
    if cfg.residual_multiplier != 1.0:
        value = value * cfg.residual_multiplier
    return value


def _post_norm(point, name, value, p, key, cfg):
    """The post-norm hook: :func:`sublayer_write` (so for pre-norm families it equals ``attn.out`` /
    ``moe.out`` times the residual multiplier)."""
    return point(name, sublayer_write(value, p.get(key), cfg))


def block(p, h, real, mask, cfg, point, iv=None, expert_impl="sparse", attn_spec=None, *, moe=True,
          positions=None, kv=None):
    """h: [batch, seq, d_model] -> (h', captures) (or (h', captures, kv') with a KV cache).

    ``iv``: this layer's slice of the interventions (or None). ``moe``: static, False at a dense-MLP layer
    (``p`` then holds ``mlp_*`` instead of the router and experts, and no routing hook is recorded).
    ``mask``: this layer's (allowed, fill); ``positions``: RoPE positions [batch, seq]; ``kv``: this layer's
    cache (k, v, step), see :func:`grokviz.model.attention.attention`.
    """
    eps = cfg.rms_eps
    h = point("resid_pre", h)
    x = point("attn.pre_norm", rms_norm(h, p["attn_pre_norm"], eps))
    a = attention(p, x, mask, cfg, point, None if iv is None else iv["head_scale"], attn_spec, positions, kv)
    if kv is not None:
        a, kv = a
    a = point("attn.out", a)
    a = _post_norm(point, "attn.post_norm", a, p, "attn_post_norm", cfg)
    h = point("resid_mid", h + a)

    x = point("moe.pre_norm", rms_norm(h, p["moe_pre_norm"], eps))
    if moe:
        gates, experts = route(x, p, cfg, point, iv)
        if point.wants("moe.expert_load"):
            one_hot = jax.nn.one_hot(experts, cfg.num_experts, dtype=jnp.int32)  # [b,t,k,e]
            point("moe.expert_load", jnp.sum(one_hot * real[:, :, None, None].astype(jnp.int32), axis=(0, 1, 2)))
        y = None
        if point.wants("moe.expert_outputs_all") or point.patched("moe.expert_outputs_all"):
            # counterfactual outputs of every expert, computed only when asked; captured only, they leave the
            # run unchanged (the slots still come from expert_impl); patched or called back, they flow on
            y_all = point("moe.expert_outputs_all", _moe.expert_outputs_all(p, x, cfg))
            if point.patched("moe.expert_outputs_all"):
                y = _moe.select_slots(y_all, experts)
        y = point("moe.expert_out", EXPERT_IMPLS[expert_impl](p, x, experts, cfg) if y is None else y)
        m = combine(gates, y, None if iv is None else iv["expert_scale"], experts)
        if cfg.shared_expert_ffn:
            m = m + shared_expert(p, x, cfg, point)
    else:
        m = dense_mlp(p, x, cfg)
    m = point("moe.out", m)
    m = _post_norm(point, "moe.post_norm", m, p, "moe_post_norm", cfg)
    h = point("resid_post", h + m)
    return (h, point.values) if kv is None else (h, point.values, kv)


@functools.cache
def routing_free_hooks() -> frozenset:
    """Hooks a dense-MLP layer records (everything except the router, experts and shared expert)."""
    from ..hooks import REGISTRY

    return frozenset(n for n in REGISTRY if n.startswith("blocks.") and not n.startswith("blocks.moe.")) | {
        "blocks.moe.pre_norm", "blocks.moe.out", "blocks.moe.post_norm"}
