"""Mixture of experts: ``route`` (router logits -> probs -> top-k, no renormalisation) kept apart from two
expert implementations with the same contract:

* ``experts_dense``: every expert on every token, then select — the reference's way, obviously correct;
* ``experts_sparse``: only the selected (token, slot) pairs are computed: up to a capacity per expert in one
  batched matmul against the stored weights, the excess in one-expert blocks by a loop over the blocks in
  use. All shapes are static, so it jits once.

Both return per-slot outputs ``[batch, seq, k, d_model]``; the gate-weighted combine is shared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..params import dense
from .layers import gelu_tanh


def route(x, w_router, cfg, point, iv=None):
    """Router in fp32 (docs/grok1.md#moe). Returns (gates [b,t,k], experts [b,t,k] int32).

    With interventions ``iv`` (one layer's slice): logits get ``+ router_bias`` then ``/ router_temperature``;
    experts marked in ``expert_remove`` are skipped by top-k (tokens take their next choice; the gates stay the
    router probabilities; a removed expert that is still picked, because more than E - k are removed or forced
    routing names it, gets gate 0); ``renormalize`` rescales the k gates to sum to 1 (Mixtral-style).
    """
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), dense(w_router, jnp.float32))
    if iv is not None:
        logits = (logits + iv["router_bias"]) / iv["router_temperature"]
    logits = point("moe.router_logits", logits)
    probs = point("moe.router_probs", jax.nn.softmax(logits, axis=-1))
    if iv is None:
        gates, experts = jax.lax.top_k(probs, cfg.top_k)
    else:
        selectable = jnp.where(iv["expert_remove"], -1.0, probs)
        _, experts = jax.lax.top_k(selectable, cfg.top_k)
    experts = experts.astype(jnp.int32)
    if point.patched("moe.top_k_experts"):
        experts = point("moe.top_k_experts", experts)
    else:
        point("moe.top_k_experts", experts)
    if iv is not None or point.patched("moe.top_k_experts"):
        gates = jnp.take_along_axis(probs, experts, axis=-1)
    if iv is not None:
        # a removed expert never contributes, even where it is still picked: when more than E - k experts are
        # removed (Model.run refuses that; a direct forward call does not), or when forced routing names it
        gates = jnp.where(jnp.take(iv["expert_remove"], experts), 0.0, gates)
        total = jnp.sum(gates, axis=-1, keepdims=True)
        renorm = jnp.where(total > 0, gates / jnp.where(total > 0, total, 1.0), 0.0)
        gates = jnp.where(iv["renormalize"], renorm, gates)
    gates = point("moe.top_k_weights", gates)
    return gates, experts


def _ffn(x, w_gate, w_up, w_down):
    """(gelu(x @ w_gate) * (x @ w_up)) @ w_down with a leading expert/block batch axis."""
    h = gelu_tanh(jnp.einsum("n...d,ndf->n...f", x, w_gate)) * jnp.einsum("n...d,ndf->n...f", x, w_up)
    return jnp.einsum("n...f,nfd->n...d", h, w_down)


def experts_dense(p, x, experts):
    """Every expert on every token (as the reference), then pick each slot's expert. -> [b,t,k,d]."""
    dt = x.dtype
    xs = jnp.broadcast_to(x[None], (p["w_gate"].shape[0],) + x.shape)
    y_all = _ffn(xs, dense(p["w_gate"], dt), dense(p["w_up"], dt), dense(p["w_down"], dt))  # [e,b,t,d]
    y_all = jnp.moveaxis(y_all, 0, 2)  # [b,t,e,d]
    return jnp.take_along_axis(y_all, experts[..., None], axis=2)


def sparse_capacity(num_tokens: int, num_slots: int, num_experts: int) -> int:
    """Rows per expert in the batched main pass: the mean slots per expert rounded up to a multiple of 8
    (at most ``num_tokens``, the most one expert can get without duplicate picks)."""
    mean = -(-num_slots // num_experts)
    return max(1, min(-(-mean // 8) * 8, num_tokens))


def sparse_block_size(num_slots: int, num_experts: int) -> int:
    """Rows per overflow block: about a quarter of the mean slots per expert, a power of two in [8, 64]."""
    target = max(1, num_slots // (4 * num_experts))
    b = 8
    while b < target and b < 64:
        b *= 2
    return b


def experts_sparse(p, x, experts, block: int | None = None):
    """Only the selected experts' work, exactly, with static shapes. -> [b,t,k,d].

    Each slot's rank among the slots of its expert comes from a cumulative count (no sort). Slots of rank
    below the capacity ``C`` (:func:`sparse_capacity`, ~ the balanced load) go to an ``[expert, C, d]`` buffer
    that runs as one batched matmul against the expert weights as stored (no per-block weight gather). The
    rest (an expert's load above ``C``) go, in one-expert blocks of ``block`` rows, to a loop whose blocks
    past the ones in use are skipped (all of them when the routing is balanced enough); the static trip count
    keeps it reverse-mode differentiable. The result equals ``experts_dense`` for any routing, including
    duplicate or all-on-one-expert picks.
    """
    dt = x.dtype
    bsz, t, d = x.shape
    k = experts.shape[-1]
    n_exp = p["w_gate"].shape[0]
    n_tok = bsz * t
    n_slots = n_tok * k
    cap = sparse_capacity(n_tok, n_slots, n_exp)
    block = block or sparse_block_size(n_slots, n_exp)
    n_over = -(-(max(n_slots - cap, 0) + n_exp * (block - 1)) // block)  # static bound on overflow blocks

    flat_e = experts.reshape(-1).astype(jnp.int32)
    one_hot = (flat_e[:, None] == jnp.arange(n_exp, dtype=jnp.int32)).astype(jnp.int32)  # [slots, e]
    rank = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)  # position among its expert's slots
    counts = jnp.sum(one_hot, axis=0)
    token = jnp.arange(n_slots, dtype=jnp.int32) // k
    in_cap = rank < cap
    x_flat = jnp.concatenate([x.reshape(n_tok, d), jnp.zeros((1, d), dt)])  # row n_tok: zeros for padding
    w_gate, w_up, w_down = (dense(p[n], dt) for n in ("w_gate", "w_up", "w_down"))

    # main pass: [expert, C] rows, one batched matmul per projection
    main_row = jnp.where(in_cap, flat_e * cap + rank, n_exp * cap)  # overflow slots write a spare row
    rows = jnp.full((n_exp * cap + 1,), n_tok, jnp.int32).at[main_row].set(token)[:-1]
    y_main = _ffn(x_flat[rows].reshape(n_exp, cap, d), w_gate, w_up, w_down).reshape(n_exp * cap, d)

    # overflow: each expert's slots of rank >= C, padded to whole blocks; loop over the used blocks only
    over = jnp.maximum(counts - cap, 0)
    padded = ((over + block - 1) // block) * block
    ends = jnp.cumsum(padded)
    over_row = jnp.where(in_cap, n_over * block, (ends - padded)[flat_e] + rank - cap)
    o_rows = jnp.full((n_over * block + 1,), n_tok, jnp.int32).at[over_row].set(token)[:-1]
    block_start = jnp.arange(n_over, dtype=jnp.int32) * block
    block_expert = jnp.minimum(jnp.sum(ends[None, :] <= block_start[:, None], axis=1), n_exp - 1)  # no search loop

    n_used = ends[-1] // block

    def one_block(i, y):
        def run(y):
            e = block_expert[i]
            xi = x_flat[jax.lax.dynamic_slice_in_dim(o_rows, i * block, block)]
            yi = _ffn(xi[None], w_gate[e][None], w_up[e][None], w_down[e][None])[0]
            return jax.lax.dynamic_update_slice_in_dim(y, yi, i * block, 0)

        return jax.lax.cond(i < n_used, run, lambda y: y, y)

    # static trip count (reverse-mode differentiable); blocks past the used ones are skipped by the cond
    y_over = jax.lax.fori_loop(0, n_over, one_block, jnp.zeros((n_over * block, d), dt))

    src = jnp.where(in_cap, main_row, n_exp * cap + over_row)
    return jnp.concatenate([y_main, y_over])[src].reshape(bsz, t, k, d)


def combine(gates, expert_out, iv_scale=None, experts=None):
    """sum_k gate_k * y_k (fp32; the reference's bf16 casts are removed by XLA under jit, see golden README).

    ``iv_scale`` [expert] multiplies each expert's contribution (0 = zero-ablation, routing unchanged).
    """
    if iv_scale is not None:
        gates = gates * iv_scale[experts]
    return jnp.einsum("btk,btkd->btd", gates.astype(expert_out.dtype), expert_out)
