"""Routing statistics from captures, padding excluded, each with its random baseline where one exists: expert
load and its balance, router entropy and gate mass, auxiliary losses, co-activation, consecutive-token rates and
layer-to-layer paths. What each expert specialises in (token classes, domains, preferred tokens) is in
:mod:`grokviz.analysis.specialisation`.

Inputs are the ``blocks.moe.*`` captures (anything ``np.asarray`` accepts, jax arrays included):

* ``experts``  ``blocks.moe.top_k_experts``  [layer, batch, seq, k] int, slot 0 = first choice;
* ``probs``    ``blocks.moe.router_probs``   [layer, batch, seq, expert];
* ``logits``   ``blocks.moe.router_logits``  [layer, batch, seq, expert];
* ``weights``  ``blocks.moe.top_k_weights``  [layer, batch, seq, k] (Grok-1: not renormalised);
* ``real``     [batch, seq] bool, False at padding (``run.real``); ``None`` means every position is real.

A single layer (no leading layer axis, e.g. ``run.cache["blocks.moe.top_k_experts", 3]``) is accepted and
treated as a stack of one layer; per-layer outputs then have a layer axis of length 1.

Everything returns numpy arrays or tidy pandas tables. Counting functions (``expert_load``, ``coactivation``,
``routing_flow``, ``consecutive_counts``) are additive over batches, which is what the dataset runners in
:mod:`grokviz.analysis.dataset` rely on; the means (entropy, gate mass, losses) come with ``*_sum`` helpers for
the same reason.
"""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd

__all__ = [
    "expert_load", "load_share", "load_cv", "routing_entropy", "gate_mass", "coactivation", "consecutive_counts",
    "consecutive_rates", "consecutive_baselines", "routing_flow", "routing_paths", "switch_aux_loss",
    "router_z_loss", "load_baseline_cv", "routing_summary", "paths_frame",
]


# ----------------------------------------------------------------------------------------------- helpers
def _layered(x, trailing: int) -> np.ndarray:
    """``x`` as [layer, batch, seq, *trailing axes]; a missing layer axis becomes length 1."""
    x = np.asarray(x)
    if x.ndim == 2 + trailing:
        x = x[None]
    if x.ndim != 3 + trailing:
        raise ValueError(f"expected [layer, batch, seq{', ...' * bool(trailing)}] "
                         f"({3 + trailing} axes), got shape {x.shape}")
    return x


def _real(real, shape) -> np.ndarray:
    """[batch, seq] bool mask (all True when ``real`` is None), checked against ``shape`` = (batch, seq)."""
    if real is None:
        return np.ones(shape, bool)
    real = np.asarray(real).astype(bool)
    if real.shape != tuple(shape):
        raise ValueError(f"real has shape {real.shape}, expected [batch, seq] = {tuple(shape)}")
    return real


def _check_ids(ids, n: int, what: str, real=None) -> np.ndarray:
    """Integer ids (at real positions, when ``real`` [batch, seq] is given) must lie in ``[0, n)``."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} ids must be integers, got dtype {ids.dtype}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of {what}s must be a positive int, got {n!r}")
    sel = ids if real is None else ids[..., real, :] if ids.ndim >= 3 else ids[real]
    bad = sel[(sel < 0) | (sel >= n)]
    if bad.size:
        raise ValueError(f"{what} id {int(bad.ravel()[0])} is outside [0, {n}) ({n} {what}s)")
    return ids


def _masked_mean(per_token: np.ndarray, real: np.ndarray) -> np.ndarray:
    """per_token [layer, batch, seq] -> [layer] mean over real positions (nan when there are none)."""
    n = real.sum()
    if n == 0:
        return np.full(per_token.shape[0], np.nan)
    return (per_token * real[None]).sum(axis=(1, 2)) / n


# ----------------------------------------------------------------------------------------------- load
def expert_load(experts, real, num_experts: int) -> np.ndarray:
    """[layer, expert] int64: token-slots routed to each expert (all k slots), padding excluded.

    Sums to ``k * n_real`` per layer. Matches the ``blocks.moe.expert_load`` hook.
    """
    experts = _layered(experts, 1)
    real = _real(real, experts.shape[1:3])
    _check_ids(experts, num_experts, "expert", real)
    n_layers = experts.shape[0]
    out = np.zeros((n_layers, num_experts), np.int64)
    for layer in range(n_layers):
        sel = experts[layer][real]  # [n_real, k]
        out[layer] = np.bincount(sel.ravel(), minlength=num_experts)[:num_experts]
    return out


def load_share(experts, real, num_experts: int) -> np.ndarray:
    """[layer, expert] float: each expert's share of the routed token-slots (rows sum to 1; nan if no tokens).

    Uniform routing gives ``1 / num_experts`` everywhere."""
    load = expert_load(experts, real, num_experts).astype(np.float64)
    total = load.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return load / total


def load_cv(experts, real, num_experts: int) -> np.ndarray:
    """[layer]: coefficient of variation of the per-expert load, std / mean (population std, ddof=0).

    0 means perfectly balanced; a layer sending every slot to one expert gives ``sqrt(E - 1)``. For a finite
    sample of uniformly random routing it is not 0 but about :func:`load_baseline_cv`."""
    load = expert_load(experts, real, num_experts).astype(np.float64)
    mean = load.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return load.std(axis=1) / mean


def load_baseline_cv(n_tokens: int, num_experts: int, k: int) -> float:
    """Expected-magnitude CV of :func:`load_cv` under uniformly random top-k routing of ``n_tokens`` tokens.

    Each expert's load is a sum of ``n_tokens`` Bernoulli(k/E) draws, so its std is
    ``sqrt(n p (1-p))`` with ``p = k/E`` and the mean is ``n p``: CV ≈ ``sqrt((1-p) / (n p))`` (the root of the
    expected squared CV up to the ddof correction ``(E-1)/E``)."""
    p = k / num_experts
    return float(np.sqrt((1 - p) / (n_tokens * p) * (num_experts - 1) / num_experts))


# ----------------------------------------------------------------------------------------------- router
def routing_entropy(probs, real) -> np.ndarray:
    """[layer]: mean over real tokens of the router distribution's entropy in nats (max ``log E``)."""
    probs = _layered(probs, 1).astype(np.float64)
    real = _real(real, probs.shape[1:3])
    plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    return _masked_mean(-plogp.sum(-1), real)


def gate_mass(weights, real) -> np.ndarray:
    """[layer]: mean over real tokens of the sum of the selected gates (``top_k_weights``).

    With Grok-1's un-renormalised top-2 this is the router probability mass that reaches the residual stream:
    1 means the router is confident in its two picks; ``k / E`` is the uniform-router floor."""
    weights = _layered(weights, 1).astype(np.float64)
    real = _real(real, weights.shape[1:3])
    return _masked_mean(weights.sum(-1), real)


def switch_aux_loss(probs, experts, real, num_experts: int) -> np.ndarray:
    """[layer]: the Switch-Transformer load-balancing loss ``E * sum_i f_i * P_i`` (a diagnostic).

    ``f_i`` is expert i's share of routed token-slots (all k slots, so ``sum f = 1``) and ``P_i`` the mean router
    probability for expert i over real tokens. Perfect balance (or a uniform router) gives 1; everything on one
    expert gives up to E. (HF Mixtral's variant counts each slot separately and equals ``k`` times this.)"""
    f = load_share(experts, real, num_experts)
    probs = _layered(probs, 1).astype(np.float64)
    real = _real(real, probs.shape[1:3])
    n = real.sum()
    p_mean = (probs * real[None, ..., None]).sum(axis=(1, 2)) / max(n, 1)
    return num_experts * (f * p_mean).sum(axis=1)


def router_z_loss(logits, real) -> np.ndarray:
    """[layer]: ST-MoE router z-loss, mean over real tokens of ``logsumexp(router_logits)**2``."""
    logits = _layered(logits, 1).astype(np.float64)
    real = _real(real, logits.shape[1:3])
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return _masked_mean(lse ** 2, real)


# ----------------------------------------------------------------------------------------------- co-activation
def coactivation(experts, real, num_experts: int) -> np.ndarray:
    """[layer, expert, expert] int64, symmetric: number of real tokens that select both i and j (i != j).

    The diagonal ``[l, i, i]`` is the number of real tokens with expert i anywhere in their top-k (which equals
    ``expert_load`` because a token's k experts are distinct), so ``C[l, i, j] / C[l, i, i]`` is
    P(j selected | i selected). Under uniform routing that conditional is ``(k - 1) / (E - 1)``."""
    experts = _layered(experts, 1)
    real = _real(real, experts.shape[1:3])
    _check_ids(experts, num_experts, "expert", real)
    n_layers, k = experts.shape[0], experts.shape[-1]
    out = np.zeros((n_layers, num_experts, num_experts), np.int64)
    for layer in range(n_layers):
        sel = experts[layer][real]  # [n, k]
        onehot = np.zeros((sel.shape[0], num_experts), np.int64)
        for s in range(k):
            onehot[np.arange(sel.shape[0]), sel[:, s]] = 1
        out[layer] = onehot.T @ onehot
    return out


# ----------------------------------------------------------------------------------------------- consecutive tokens
def _consecutive_pairs(experts, real):
    experts = _layered(experts, 1)
    real = _real(real, experts.shape[1:3])
    pair = real[:, :-1] & real[:, 1:]  # [batch, seq-1]: both tokens of the pair are real
    a, b = experts[:, :, :-1], experts[:, :, 1:]  # [layer, batch, seq-1, k]
    first = a[..., 0] == b[..., 0]
    overlap = (a[..., :, None] == b[..., None, :]).any(axis=(-1, -2))
    return first, overlap, pair


def consecutive_counts(experts, real) -> np.ndarray:
    """[layer, 3] int64: (first-choice repeats, top-k overlaps, pairs) over consecutive real-token pairs.

    Additive over batches; :func:`consecutive_rates` divides them."""
    first, overlap, pair = _consecutive_pairs(experts, real)
    n = int(pair.sum())
    return np.stack([(first & pair[None]).sum(axis=(1, 2)), (overlap & pair[None]).sum(axis=(1, 2)),
                     np.full(first.shape[0], n)], axis=1).astype(np.int64)


def _rates_frame(counts: np.ndarray) -> pd.DataFrame:
    n = counts[:, 2].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({"layer": np.arange(len(counts)), "first_repeat": counts[:, 0] / n,
                             "topk_overlap": counts[:, 1] / n, "n_pairs": counts[:, 2]})


def consecutive_rates(experts, real) -> pd.DataFrame:
    """Mixtral-paper consecutive-token statistics, one row per layer.

    Columns: ``layer``; ``first_repeat`` (share of consecutive real-token pairs, within a row, whose first-choice
    expert is the same); ``topk_overlap`` (share whose top-k sets share at least one expert); ``n_pairs``.
    Pairs that touch padding are skipped. Compare with :func:`consecutive_baselines`."""
    return _rates_frame(consecutive_counts(experts, real))


def consecutive_baselines(num_experts: int, k: int) -> dict:
    """Rates of :func:`consecutive_rates` under independent uniformly random top-k routing.

    ``first_repeat = 1/E``; ``topk_overlap = 1 - C(E-k, k) / C(E, k)`` (the chance that two random k-subsets
    are not disjoint). E=8, k=2: 0.125 and 13/28 = 0.4643."""
    return {"first_repeat": 1.0 / num_experts,
            "topk_overlap": 1.0 - comb(num_experts - k, k) / comb(num_experts, k)}


# ----------------------------------------------------------------------------------------------- paths
def routing_flow(experts, real, layer: int, num_experts: int | None = None) -> np.ndarray:
    """[expert, expert] int64: real tokens whose first choice is i at ``layer`` and j at ``layer + 1``.

    ``num_experts`` defaults to ``max(experts) + 1``. Under independent uniform routing every cell is
    ``n / E**2``."""
    experts = _layered(experts, 1)
    real = _real(real, experts.shape[1:3])
    n_layers = experts.shape[0]
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer must be an int, got {layer!r}")
    if not -n_layers <= layer < n_layers - 1:
        raise ValueError(f"layer {layer} has no next layer: with {n_layers} layers it must be in "
                         f"[-{n_layers}, {n_layers - 1})")
    layer = layer + n_layers if layer < 0 else layer
    if layer == n_layers - 1:
        raise ValueError(f"layer {layer - n_layers} is the last of {n_layers} layers: it has no next layer")
    e = int(experts.max()) + 1 if num_experts is None else num_experts
    _check_ids(experts[layer:layer + 2], e, "expert", real)
    a = experts[layer, ..., 0][real]
    b = experts[layer + 1, ..., 0][real]
    return np.bincount(a * e + b, minlength=e * e)[: e * e].reshape(e, e).astype(np.int64)


def paths_frame(flows) -> pd.DataFrame:
    """Tidy table from first-choice flow matrices [layer, src_expert, dst_expert] (see :func:`routing_paths`)."""
    frames = []
    for layer, flow in enumerate(np.asarray(flows, np.float64)):
        e = flow.shape[0]
        n = flow.sum()
        expect = flow.sum(1, keepdims=True) * flow.sum(0, keepdims=True) / max(n, 1)
        src, dst = np.meshgrid(np.arange(e), np.arange(e), indexing="ij")
        with np.errstate(invalid="ignore", divide="ignore"):
            frames.append(pd.DataFrame({"layer": layer, "src_expert": src.ravel(), "dst_expert": dst.ravel(),
                                        "count": flow.ravel().astype(np.int64), "share": (flow / n).ravel(),
                                        "lift": (flow / expect).ravel()}))
    cols = ["layer", "src_expert", "dst_expert", "count", "share", "lift"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def routing_paths(experts, real, num_experts: int | None = None) -> pd.DataFrame:
    """Tidy table of first-choice flows between every pair of adjacent layers.

    Columns: layer (source), src_expert, dst_expert, count, share (of the layer's tokens), lift (count over the
    independence expectation ``row_total * col_total / n``; 1 means no path preference)."""
    experts = _layered(experts, 1)
    e = int(experts.max()) + 1 if num_experts is None else num_experts
    return paths_frame([routing_flow(experts, real, layer, e) for layer in range(experts.shape[0] - 1)])


# ----------------------------------------------------------------------------------------------- summary
def routing_summary(cache, real, num_experts: int) -> pd.DataFrame:
    """One row per layer with every scalar routing statistic that the captures in ``cache`` allow.

    ``cache`` is a mapping with some of ``blocks.moe.top_k_experts`` / ``router_probs`` / ``router_logits`` /
    ``top_k_weights`` (an ActivationCache or a plain dict)."""
    cols: dict = {}
    ex = cache.get("blocks.moe.top_k_experts") if hasattr(cache, "get") else None
    if ex is not None:
        k = np.asarray(ex).shape[-1]
        cols["load_cv"] = load_cv(ex, real, num_experts)
        rates = consecutive_rates(ex, real)
        base = consecutive_baselines(num_experts, k)
        cols["first_repeat"] = rates["first_repeat"].to_numpy()
        cols["first_repeat_baseline"] = base["first_repeat"]
        cols["topk_overlap"] = rates["topk_overlap"].to_numpy()
        cols["topk_overlap_baseline"] = base["topk_overlap"]
    if "blocks.moe.router_probs" in cache:
        cols["entropy"] = routing_entropy(cache["blocks.moe.router_probs"], real)
        cols["entropy_max"] = np.log(num_experts)
        if ex is not None:
            cols["switch_aux_loss"] = switch_aux_loss(cache["blocks.moe.router_probs"], ex, real, num_experts)
    if "blocks.moe.top_k_weights" in cache:
        cols["gate_mass"] = gate_mass(cache["blocks.moe.top_k_weights"], real)
    if "blocks.moe.router_logits" in cache:
        cols["router_z_loss"] = router_z_loss(cache["blocks.moe.router_logits"], real)
    n_layers = max((np.size(v) for v in cols.values()), default=0)
    return pd.DataFrame({"layer": np.arange(n_layers), **cols})
