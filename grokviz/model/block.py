"""One decoder block (docs/grok1.md#block): sandwich norms around attention and the MoE. The lax.scan body."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .attention import attention
from .layers import rms_norm
from .moe import combine, experts_dense, experts_sparse, route

EXPERT_IMPLS = {"dense": experts_dense, "sparse": experts_sparse}


def block(p, h, real, mask, cfg, point, iv=None, expert_impl="sparse", attn_spec=None):
    """h: [batch, seq, d_model] -> (h', captures). ``iv`` is this layer's slice of the interventions (or None)."""
    eps = cfg.rms_eps
    h = point("resid_pre", h)
    x = point("attn.pre_norm", rms_norm(h, p["attn_pre_norm"], eps))
    a = point("attn.out", attention(p, x, mask, cfg, point, None if iv is None else iv["head_scale"],
                                      attn_spec))
    a = point("attn.post_norm", rms_norm(a, p["attn_post_norm"], eps))
    h = point("resid_mid", h + a)

    x = point("moe.pre_norm", rms_norm(h, p["moe_pre_norm"], eps))
    gates, experts = route(x, p["router"], cfg, point, iv)
    if point.wants("moe.expert_load"):
        one_hot = jax.nn.one_hot(experts, cfg.num_experts, dtype=jnp.int32)  # [b,t,k,e]
        point("moe.expert_load", jnp.sum(one_hot * real[:, :, None, None].astype(jnp.int32), axis=(0, 1, 2)))
    y = point("moe.expert_out", EXPERT_IMPLS[expert_impl](p, x, experts))
    m = combine(gates, y, None if iv is None else iv["expert_scale"], experts)
    m = point("moe.out", m)
    m = point("moe.post_norm", rms_norm(m, p["moe_post_norm"], eps))
    h = point("resid_post", h + m)
    return h, point.values
