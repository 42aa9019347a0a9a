"""Mixture of experts: ``route`` (router logits -> probs -> top-k, no renormalisation) kept apart from two
expert implementations with the same contract:

* ``experts_dense``: every expert on every token, then select — the reference's way, obviously correct;
* ``experts_sparse``: only the selected (token, slot) pairs are computed. Slots are sorted by expert into
  fixed-size blocks (each block holds one expert's slots; each expert's segment is padded to a whole number
  of blocks), run as one batched matmul, and scattered back. All shapes are static, so it jits once.

Both return per-slot outputs ``[batch, seq, k, d_model]``; the gate-weighted combine is shared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..params import dense
from .layers import gelu_tanh


def route(x, w_router, cfg, point, iv=None):
    """Router in fp32 (spec §3.6.1-2). Returns (gates [b,t,k], experts [b,t,k] int32).

    With interventions ``iv`` (one layer's slice): logits get ``+ router_bias`` then ``/ router_temperature``;
    experts marked in ``expert_remove`` are skipped by top-k (tokens take their next choice; the gates stay the
    router probabilities); ``renormalize`` rescales the k gates to sum to 1 (Mixtral-style).
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
        renorm = gates / jnp.sum(gates, axis=-1, keepdims=True)
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


def sparse_block_size(num_slots: int, num_experts: int) -> int:
    """Rows per block: about the mean slots per expert, a power of two in [8, 128]."""
    target = max(1, num_slots // num_experts)
    b = 8
    while b < target and b < 128:
        b *= 2
    return b


def experts_sparse(p, x, experts, block: int | None = None):
    """Only the selected experts' work: sort slots by expert into one-expert blocks. -> [b,t,k,d]."""
    dt = x.dtype
    bsz, t, d = x.shape
    k = experts.shape[-1]
    n_exp = p["w_gate"].shape[0]
    n_slots = bsz * t * k
    block = block or sparse_block_size(n_slots, n_exp)
    n_blocks = -(-(n_slots + n_exp * (block - 1)) // block)  # static upper bound on blocks needed

    flat_e = experts.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)                    # slot ids sorted by expert
    sorted_e = flat_e[order]
    counts = jnp.bincount(flat_e, length=n_exp)
    padded = ((counts + block - 1) // block) * block
    pad_start = jnp.cumsum(padded) - padded                    # where each expert's segment starts
    start = jnp.cumsum(counts) - counts
    dest = pad_start[sorted_e] + (jnp.arange(n_slots) - start[sorted_e])  # buffer row of each sorted slot

    token_of_slot = order // k
    rows = jnp.full((n_blocks * block,), bsz * t, jnp.int32).at[dest].set(token_of_slot.astype(jnp.int32))
    x_flat = jnp.concatenate([x.reshape(-1, d), jnp.zeros((1, d), dt)])  # last row: zeros for padding
    xb = x_flat[rows].reshape(n_blocks, block, d)
    block_start = jnp.arange(n_blocks) * block
    block_expert = jnp.clip(jnp.searchsorted(jnp.cumsum(padded), block_start, side="right"), 0, n_exp - 1)

    w_gate = dense(p["w_gate"], dt)[block_expert]
    w_up = dense(p["w_up"], dt)[block_expert]
    w_down = dense(p["w_down"], dt)[block_expert]
    yb = _ffn(xb, w_gate, w_up, w_down).reshape(n_blocks * block, d)

    slot_row = jnp.zeros((n_slots,), jnp.int32).at[order].set(dest.astype(jnp.int32))
    return yb[slot_row].reshape(bsz, t, k, d)


def combine(gates, expert_out, iv_scale=None, experts=None):
    """sum_k gate_k * y_k (fp32; the reference's bf16 casts are removed by XLA under jit, see golden README).

    ``iv_scale`` [expert] multiplies each expert's contribution (0 = zero-ablation, routing unchanged).
    """
    if iv_scale is not None:
        gates = gates * iv_scale[experts]
    return jnp.einsum("btk,btkd->btd", gates.astype(expert_out.dtype), expert_out)
