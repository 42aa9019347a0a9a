"""Mixture of experts: ``route`` (router logits -> probs -> top-k -> gates, by the config's scoring rule) kept
apart from two expert implementations with the same contract:

* ``experts_dense``: every expert on every token, then select — the reference's way, obviously correct;
* ``experts_sparse``: only the selected (token, slot) pairs are computed: up to a capacity per expert in one
  batched matmul against the stored weights, the excess in one-expert blocks by a loop over the blocks in
  use. All shapes are static, so it jits once.

Both return per-slot outputs ``[batch, seq, k, d_model]``; the gate-weighted combine is shared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..params import Int8Weight, dense
from .layers import gated_ffn


def _renormalise(gates):
    total = jnp.sum(gates, axis=-1, keepdims=True)
    return jnp.where(total > 0, gates / jnp.where(total > 0, total, 1.0), 0.0)


def route(x, p, cfg, point, iv=None):
    """Router in fp32 (docs/grok1.md#moe, docs/families.md#routers). Returns (gates [b,t,k], experts [b,t,k]).

    ``p``: the layer's params (``router`` [d, e], ``router_b`` [e] when the family has a router bias). Logits
    ``x @ router (+ router_b)`` (hook ``router_logits``); ``router_probs`` is the softmax over all experts. Then
    by ``cfg.router_rule``:

    * ``softmax_topk`` (Grok, Mixtral, OLMoE, Qwen): the k most probable experts; gates = their probabilities,
      rescaled to sum to 1 when ``cfg.router_renormalize`` (Mixtral, Qwen3; Grok, OLMoE and Qwen1.5-MoE do not);
    * ``topk_softmax`` (Granite, gpt-oss): the k largest logits; gates = softmax over those k logits (equal to
      the renormalised probabilities up to rounding).

    With interventions ``iv`` (one layer's slice): logits get ``+ router_bias`` then ``/ router_temperature``;
    experts marked in ``expert_remove`` are skipped by top-k (tokens take their next choice; the gates are then
    formed by the family's rule over the experts actually selected, so a renormalising family renormalises over
    the survivors, and Grok keeps the router probabilities). A removed expert that is still picked (more than
    E - k removed, or forced routing names it) gets gate 0. ``renormalize`` rescales the k gates to sum to 1.
    ``expert_swap`` [expert] int32 (identity = none): a slot that selected expert ``a`` runs expert
    ``expert_swap[a]`` instead, at the gate formed for ``a`` (the *swap* ablation). A forced-routing patch (or a
    callback) of ``moe.top_k_experts`` acts on the picked experts, before the swap; the hook records the experts
    that run, after it.
    """
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), dense(p["router"], jnp.float32))
    if cfg.router_bias:
        logits = logits + p["router_b"].astype(jnp.float32)
    if iv is not None:
        logits = (logits + iv["router_bias"]) / iv["router_temperature"]
    logits = point("moe.router_logits", logits)
    probs = point("moe.router_probs", jax.nn.softmax(logits, axis=-1))
    score = probs if cfg.router_rule == "softmax_topk" else logits
    if iv is None:
        top, experts = jax.lax.top_k(score, cfg.top_k)
    else:
        _, experts = jax.lax.top_k(jnp.where(iv["expert_remove"], -jnp.inf, score), cfg.top_k)
    picked = experts.astype(jnp.int32)
    forced = point.patched("moe.top_k_experts")
    if forced:  # forced routing (or a callback) names the picked experts
        picked = point("moe.top_k_experts", picked)
    # the swap ablation: the slot runs another expert at the picked expert's gate
    experts = picked if iv is None else jnp.take(iv["expert_swap"], picked)
    if not forced:
        point("moe.top_k_experts", experts)
    elif iv is not None and point.prefix + "moe.top_k_experts" in point.selected:
        point.values[point.prefix + "moe.top_k_experts"] = experts  # record the experts that run
    if iv is not None or point.patched("moe.top_k_experts"):
        top = jnp.take_along_axis(score, picked, axis=-1)
    # a removed expert never contributes, even where it is still picked: when more than E - k are removed
    # (Model.run refuses that; a direct forward call does not), or when forced routing names it
    removed = None if iv is None else jnp.take(iv["expert_remove"], experts)
    if cfg.router_rule == "softmax_topk":
        gates = top if removed is None else jnp.where(removed, 0.0, top)
        if cfg.router_renormalize:
            gates = _renormalise(gates)
    else:  # softmax over the k picked logits; all picks removed gives 0, not NaN
        if removed is not None:
            top = jnp.where(removed, -jnp.inf, top)
        m = jnp.max(top, axis=-1, keepdims=True)
        e = jnp.where(jnp.isneginf(top), 0.0, jnp.exp(top - jnp.where(jnp.isneginf(m), 0.0, m)))
        gates = _renormalise(e)
    if iv is not None:
        gates = jnp.where(iv["renormalize"], _renormalise(gates), gates)
    gates = point("moe.top_k_weights", gates)
    return gates, experts


def _ffn(x, w_gate, w_up, w_down, cfg, biases=None):
    """act(x @ w_gate, x @ w_up) @ w_down (:func:`grokviz.model.layers.gated_ffn`) with a leading expert/block
    batch axis; ``biases`` (b_gate, b_up, b_down) each with that leading axis (gpt-oss)."""
    g, u = jnp.einsum("n...d,ndf->n...f", x, w_gate), jnp.einsum("n...d,ndf->n...f", x, w_up)
    if biases is not None:
        g, u = g + _expand(biases[0], g), u + _expand(biases[1], u)
    y = jnp.einsum("n...f,nfd->n...d", gated_ffn(g, u, cfg), w_down)
    return y if biases is None else y + _expand(biases[2], y)


def _expand(b, like):
    """A per-expert bias [n, f] broadcast against ``like`` [n, ..., f]."""
    return b.reshape(b.shape[:1] + (1,) * (like.ndim - 2) + b.shape[1:]).astype(like.dtype)


def _biases(p, cfg, dt):
    return tuple(p[n].astype(dt) for n in ("b_gate", "b_up", "b_down")) if cfg.expert_bias else None


def expert_outputs_all(p, x, cfg):
    """What every expert would write for every token, selected or not: ``x`` [b,t,d] -> [b,t,expert,d] (before
    gating; the hook ``blocks.moe.expert_outputs_all``, the counterfactual expert outputs)."""
    dt = x.dtype
    xs = jnp.broadcast_to(x[None], (p["w_gate"].shape[0],) + x.shape)
    y_all = _ffn(xs, dense(p["w_gate"], dt), dense(p["w_up"], dt), dense(p["w_down"], dt), cfg,
                 _biases(p, cfg, dt))  # [e,b,t,d]
    return jnp.moveaxis(y_all, 0, 2)  # [b,t,e,d]


def select_slots(y_all, experts):
    """Each slot's expert output from the all-expert outputs: [b,t,e,d], [b,t,k] -> [b,t,k,d]."""
    return jnp.take_along_axis(y_all, experts[..., None], axis=2)


def experts_dense(p, x, experts, cfg):
    """Every expert on every token (as the reference), then pick each slot's expert. -> [b,t,k,d]."""
    return select_slots(expert_outputs_all(p, x, cfg), experts)


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


def experts_sparse(p, x, experts, cfg, block: int | None = None):
    """Only the selected experts' work, exactly, with static shapes. -> [b,t,k,d].

    Each slot's rank among the slots of its expert comes from a cumulative count (no sort). Slots of rank
    below the capacity ``C`` (:func:`sparse_capacity`, ~ the balanced load) go to an ``[expert, C, d]`` buffer
    that runs as one batched matmul against the expert weights as stored (no per-block weight gather). The
    rest (an expert's load above ``C``) go, in one-expert blocks of ``block`` rows, to a loop whose blocks
    past the ones in use are skipped (all of them when the routing is balanced enough); the static trip count
    keeps it reverse-mode differentiable. The result equals ``experts_dense`` for any routing, including
    duplicate or all-on-one-expert picks.

    With fewer slots than experts (decoding a few tokens) each slot instead runs on its own expert's weights,
    gathered (:func:`experts_gathered`), so only the selected experts' weights are read, not every expert's.
    """
    dt = x.dtype
    bsz, t, d = x.shape
    k = experts.shape[-1]
    n_exp = p["w_gate"].shape[0]
    n_tok = bsz * t
    n_slots = n_tok * k
    if n_slots < n_exp and block is None:
        return experts_gathered(p, x, experts, cfg)
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
    biases = _biases(p, cfg, dt)

    # main pass: [expert, C] rows, one batched matmul per projection
    main_row = jnp.where(in_cap, flat_e * cap + rank, n_exp * cap)  # overflow slots write a spare row
    rows = jnp.full((n_exp * cap + 1,), n_tok, jnp.int32).at[main_row].set(token)[:-1]
    y_main = _ffn(x_flat[rows].reshape(n_exp, cap, d), w_gate, w_up, w_down, cfg, biases).reshape(n_exp * cap, d)

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
            bi = None if biases is None else tuple(b[e][None] for b in biases)
            yi = _ffn(xi[None], w_gate[e][None], w_up[e][None], w_down[e][None], cfg, bi)[0]
            return jax.lax.dynamic_update_slice_in_dim(y, yi, i * block, 0)

        return jax.lax.cond(i < n_used, run, lambda y: y, y)

    # static trip count (reverse-mode differentiable); blocks past the used ones are skipped by the cond
    y_over = jax.lax.fori_loop(0, n_over, one_block, jnp.zeros((n_over * block, d), dt))

    src = jnp.where(in_cap, main_row, n_exp * cap + over_row)
    return jnp.concatenate([y_main, y_over])[src].reshape(bsz, t, k, d)


def _take_experts(w, idx, dt):
    """The float weights of experts ``idx`` [n] of an expert-stacked leaf [expert, ...] (an Int8Weight is
    gathered before it is dequantised, so only those experts are read)."""
    if isinstance(w, Int8Weight):
        return Int8Weight(weight=jnp.take(w.weight, idx, axis=0), scales=jnp.take(w.scales, idx, axis=0)
                          ).dequantize(dt)
    return jnp.take(w, idx, axis=0).astype(dt)


def experts_gathered(p, x, experts, cfg):
    """Each (token, slot) on its own expert's gathered weights -> [b,t,k,d]: reads k experts per token instead of
    all of them (the fast path for decoding, where a step has fewer slots than experts). Same result as
    ``experts_dense`` for any routing."""
    dt = x.dtype
    bsz, t, d = x.shape
    k = experts.shape[-1]
    idx = experts.reshape(-1).astype(jnp.int32)                      # [slots]
    xs = jnp.repeat(x.reshape(bsz * t, d), k, axis=0)[:, None, :]     # [slots, 1, d]
    w_gate, w_up, w_down = (_take_experts(p[n], idx, dt) for n in ("w_gate", "w_up", "w_down"))
    biases = None if not cfg.expert_bias else tuple(jnp.take(p[n], idx, axis=0).astype(dt)
                                                    for n in ("b_gate", "b_up", "b_down"))
    return _ffn(xs, w_gate, w_up, w_down, cfg, biases).reshape(bsz, t, k, d)


def shared_expert(p, x, cfg, point):
    """Qwen2-MoE's shared expert: ``sigmoid(x @ s_router) * mlp(x)`` added to the routed output, for every token.
    Hooks: ``moe.shared_out`` (the expert's output before its gate) and ``moe.shared_gate`` [b, t]."""
    dt = x.dtype
    y = _ffn(x[None], dense(p["s_gate"], dt)[None], dense(p["s_up"], dt)[None], dense(p["s_down"], dt)[None],
             cfg)[0]
    y = point("moe.shared_out", y)
    gate = point("moe.shared_gate", jax.nn.sigmoid(jnp.einsum("btd,d->bt", x, p["s_router"].astype(dt))))
    return gate[..., None] * y


def dense_mlp(p, x, cfg):
    """The dense MLP of a layer without experts (``mlp_only_layers`` / ``decoder_sparse_step``)."""
    dt = x.dtype
    return _ffn(x[None], dense(p["mlp_gate"], dt)[None], dense(p["mlp_up"], dt)[None],
                dense(p["mlp_down"], dt)[None], cfg)[0]


def combine(gates, expert_out, iv_scale=None, experts=None):
    """sum_k gate_k * y_k (fp32; the reference's bf16 casts are removed by XLA under jit, see golden README).

    ``iv_scale`` [expert] multiplies each expert's contribution (0 = zero-ablation, routing unchanged).
    """
    if iv_scale is not None:
        gates = gates * iv_scale[experts]
    return jnp.einsum("btk,btkd->btd", gates.astype(expert_out.dtype), expert_out)
