"""Ablation sweeps: every (layer, expert) or (layer, head) ablated one at a time over a dataset, as a tidy table
(:func:`ablation_sweep`; the three named expert ablations: grokviz.interventions.ABLATIONS).

A change at layer ``l`` cannot affect layers before it, so the baseline run is made once with
``blocks.resid_pre`` captured, and each variant runs only layers ``l .. L-1`` from the captured residual stream
(the suffix forward of :mod:`grokviz.analysis.suffix`), ``vmap``-ped over the variants of a layer. Sweeping E
experts over L layers thus costs about ``E * L * (L + 1) / 2`` layer evaluations, batched, instead of ``E * L * L``
in ``E * L`` separate forwards. The contribution ablation reuses even the ablated layer: its MoE output is the
captured one minus the expert's gated slots, and only the later layers run.

``loss`` is the mean next-token cross-entropy (nats) at the prediction pairs, ``kl`` the mean
``KL(baseline || ablated)`` of the next-token distributions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..model.block import sublayer_write
from ..model.transformer import forward, unembed
from .suffix import _base_terms, _layers, _lm_sums_jit, _loss_sums, suffix_hidden

__all__ = ["ablation_sweep", "ablation_sums", "separate_ablation_sums", "sums_to_frame", "swap_targets"]


_BASE_CAPTURE = frozenset({"blocks.resid_pre", "blocks.resid_mid", "blocks.moe.out", "blocks.moe.expert_out",
                           "blocks.moe.top_k_weights", "blocks.moe.top_k_experts"})


@functools.partial(jax.jit, static_argnames=("cfg", "expert_impl", "capture"))
def _baseline(params, tokens, cfg, expert_impl, capture=frozenset({"blocks.resid_pre"})):
    out = forward(params, tokens, cfg, capture=capture, expert_impl=expert_impl)
    base = _base_terms(out.logits, tokens, cfg.pad_token)
    nll, _ = _loss_sums(out.logits, tokens, base)
    return out.cache, base, nll, jnp.sum(base["valid"])


@functools.partial(jax.jit, static_argnames=("cfg", "expert_impl"))
def _sweep_layer(params, tokens, h0, base, ivs, start, cfg, expert_impl):
    """Generic: every variant runs layers start.. from resid_pre[start] with its own interventions."""
    hs = jax.vmap(lambda iv: suffix_hidden(params, cfg, tokens, h0, start, iv, None, expert_impl))(ivs)
    return jax.lax.map(lambda x: _loss_sums(unembed(params, x, cfg), tokens, base), hs)


@functools.partial(jax.jit, static_argnames=("cfg", "expert_impl"))
def _sweep_zero_experts(params, tokens, cache, base, layer, slot, units, cfg, expert_impl):
    """Zero-ablation of experts ``units`` at ``layer`` (``slot``: its index among the MoE layers, along which the
    routing captures are stacked): routing and expert outputs of that layer are unchanged, so its MoE output is
    the captured one minus the ablated expert's gated slots (a shared expert stays), written into the residual
    stream by the model's own :func:`~grokviz.model.block.sublayer_write`, and only layers ``layer + 1 ..`` run,
    for all variants as one batch."""
    y = cache["blocks.moe.expert_out"][slot]                       # [b, t, k, d]
    ex = cache["blocks.moe.top_k_experts"][slot]                   # [b, t, k]
    gates = cache["blocks.moe.top_k_weights"][slot]
    drop = ex[None] == units[:, None, None, None]                  # [n, b, t, k]
    g = jnp.where(drop, gates[None], 0.0).astype(y.dtype)
    m = cache["blocks.moe.out"][layer][None] - jnp.einsum("nbtk,btkd->nbtd", g, y)
    scale = params["blocks"]["moe_post_norm"][layer] if cfg.sandwich else None
    h = cache["blocks.resid_mid"][layer][None] + sublayer_write(m, scale, cfg)   # [n, b, t, d]
    # later layers have no intervention: fold the variants into the batch axis (one plain, wider forward)
    n, b, t, d = h.shape
    hf = suffix_hidden(params, cfg, jnp.tile(tokens, (n, 1)), h.reshape(n * b, t, d), layer + 1, None, None,
                       expert_impl)
    # read out one variant at a time: a [n, b, t, vocab] block of logits would not stay in cache
    return jax.lax.map(lambda x: _loss_sums(unembed(params, x, cfg), tokens, base), hf.reshape(n, b, t, d))


def _no_interventions(cfg) -> dict:
    from ..interventions import Interventions

    return Interventions.none(cfg).split()[0]


def _ablation_ivs(cfg, kind: str, mode: str, layer: int, units, targets=None) -> dict:
    """Per-layer intervention dicts with a leading variant axis: unit ``units[n]`` ablated at ``layer`` (swapped
    to ``targets[units[n]]`` under ``mode="swap"``)."""
    base = _no_interventions(cfg)
    n = len(units)
    ivs = {k: np.broadcast_to(np.asarray(v), (n,) + v.shape).copy() for k, v in base.items()}
    idx = np.arange(n)
    units = np.asarray(units)
    if kind == "expert" and mode == "contribution":
        ivs["expert_scale"][idx, layer, units] = 0.0
    elif kind == "expert" and mode == "route_around":
        ivs["expert_remove"][idx, layer, units] = True
    elif kind == "expert" and mode == "swap":
        ivs["expert_swap"][idx, layer, units] = np.asarray(targets)[units]
    elif kind == "head":
        ivs["head_scale"][idx, layer, units] = 0.0
    return {k: jnp.asarray(v) for k, v in ivs.items()}


def _chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (variants per batch), got {chunk!r}")
    return int(chunk)


def _check_kind(cfg, kind, mode):
    from ..interventions import ablation_name

    if kind not in ("expert", "head"):
        raise ValueError(f"kind must be 'expert' or 'head', got {kind!r}")
    mode = ablation_name(mode) if kind == "expert" else mode
    return (cfg.num_experts if kind == "expert" else cfg.num_q_heads), mode


def swap_targets(cfg, swap_to=None) -> np.ndarray:
    """The swap sweep's target rule as [expert] ids: ``None`` (default) sends expert e to ``(e + 1) % E``; an int
    sends every expert there (that expert itself is then a no-op, Δ = 0); or one target per expert."""
    E = cfg.num_experts
    if swap_to is None:
        return (np.arange(E) + 1) % E
    t = np.broadcast_to(np.asarray(swap_to), (E,)) if np.ndim(swap_to) == 0 else np.asarray(swap_to)
    if t.shape != (E,) or t.dtype == bool or not np.issubdtype(t.dtype, np.integer) or t.min() < 0 or t.max() >= E:
        raise ValueError(f"swap_to must be None (e -> e + 1 mod {E}), an expert id or {E} expert ids, all in "
                         f"[0, {E}), got {swap_to!r}")
    return t.astype(np.int32)


def ablation_sums(model, tokens, *, kind="expert", mode="contribution", layers=None, chunk=None,
                  expert_impl="sparse", swap_to=None) -> dict:
    """One batch of an ablation sweep, as additive sums (see :func:`ablation_sweep`).

    Returns dict(layer [n], unit [n], nll [n], kl [n], base_nll scalar, n_pred scalar; to [n] under swap)."""
    cfg, params = model.cfg, model.params
    n_units, mode = _check_kind(cfg, kind, mode)
    targets = swap_targets(cfg, swap_to) if mode == "swap" else None
    tokens = jnp.asarray(model.to_tokens(tokens))
    layers = _layers(layers, cfg, kind)
    chunk = n_units if chunk is None else _chunk(chunk)
    fast = kind == "expert" and mode == "contribution"
    capture = _BASE_CAPTURE if fast else frozenset({"blocks.resid_pre"})
    cache, base, base_nll, n_pred = _baseline(params, tokens, cfg, expert_impl, capture)
    out = {"layer": [], "unit": [], "nll": [], "kl": []}
    for layer in layers:
        for lo in range(0, n_units, chunk):
            units = list(range(lo, min(lo + chunk, n_units)))
            units_padded = units + [units[-1]] * (chunk - len(units))  # keep one compiled shape
            if fast:
                nll, kl = _sweep_zero_experts(params, tokens, cache, base, jnp.int32(layer),
                                              jnp.int32(cfg.moe_layer_ids.index(layer)),
                                              jnp.asarray(units_padded, jnp.int32), cfg, expert_impl)
            else:
                ivs = _ablation_ivs(cfg, kind, mode, layer, units_padded, targets)
                nll, kl = _sweep_layer(params, tokens, cache["blocks.resid_pre"][layer], base, ivs,
                                       jnp.int32(layer), cfg, expert_impl)
            out["layer"] += [layer] * len(units)
            out["unit"] += units
            out["nll"].append(np.asarray(nll)[: len(units)])
            out["kl"].append(np.asarray(kl)[: len(units)])
    res = {"layer": np.asarray(out["layer"]), "unit": np.asarray(out["unit"]),
           "nll": np.concatenate(out["nll"]).astype(np.float64), "kl": np.concatenate(out["kl"]).astype(np.float64),
           "base_nll": float(base_nll), "n_pred": float(n_pred)}
    return res if targets is None else {**res, "to": targets[res["unit"]]}


def separate_ablation_sums(model, tokens, *, kind="expert", mode="contribution", layers=None,
                           expert_impl="sparse", swap_to=None) -> dict:
    """The same sums as :func:`ablation_sums`, one full ``model.run`` per ablation (the reference and the
    benchmark's baseline)."""
    from ..interventions import Interventions

    cfg = model.cfg
    n_units, mode = _check_kind(cfg, kind, mode)
    targets = swap_targets(cfg, swap_to) if mode == "swap" else None
    tokens = model.to_tokens(tokens)
    layers = _layers(layers, cfg, kind)
    base = jnp.asarray(model.run(tokens, expert_impl=expert_impl).logits)
    base_nll, _, n_pred = _lm_sums_jit(base, jnp.asarray(tokens), cfg.pad_token)
    out = {"layer": [], "unit": [], "nll": [], "kl": []}
    none = Interventions.none(cfg)
    for layer in layers:
        for u in range(n_units):
            iv = (none.ablate_head(layer, u) if kind == "head" else
                  none.ablate_expert(layer, u, how=mode, to=None if targets is None else int(targets[u])))
            logits = jnp.asarray(model.run(tokens, interventions=iv, expert_impl=expert_impl).logits)
            nll, kl, _ = _lm_sums_jit(logits, jnp.asarray(tokens), cfg.pad_token, base)
            out["layer"].append(layer)
            out["unit"].append(u)
            out["nll"].append(float(nll))
            out["kl"].append(float(kl))
    return {**{k: np.asarray(v) for k, v in out.items()}, "base_nll": float(base_nll), "n_pred": float(n_pred)}


def sums_to_frame(sums: dict, kind: str) -> pd.DataFrame:
    """Tidy table from (accumulated) sweep sums: layer, expert|head, loss, base_loss, delta_loss, kl, n_tokens."""
    n = max(sums["n_pred"], 1.0)
    loss = sums["nll"] / n
    base = sums["base_nll"] / n
    to = {"to": sums["to"]} if "to" in sums else {}
    return pd.DataFrame({"layer": sums["layer"], kind: sums["unit"], **to, "loss": loss, "base_loss": base,
                         "delta_loss": loss - base, "kl": sums["kl"] / n,
                         "n_tokens": np.full(len(loss), int(sums["n_pred"]))})


def ablation_sweep(model, data, *, kind="expert", mode="contribution", layers=None, chunk=None, batch_size=8,
                   max_len=None, expert_impl="sparse", progress=True, swap_to=None) -> pd.DataFrame:
    """Ablate every (layer, expert) — or (layer, head) with ``kind="head"`` — one at a time, over a dataset.

    ``data``: token ids [batch, seq] (one batch), or anything :func:`grokviz.analysis.dataset.batches` accepts
    (texts, token lists, None for the bundled validation split). ``mode`` (experts; grokviz.interventions
    ABLATIONS): ``"contribution"`` (old name ``"zero"``) multiplies the expert's gated output by 0 with routing
    unchanged; ``"route_around"`` (``"remove"``) makes the router skip it (tokens take their next choice; gates by
    the family's rule over the experts selected); ``"swap"`` sends its slots to expert ``swap_to`` at the same gates
    (:func:`swap_targets`: default ``e -> (e + 1) % E``). Returns one row per ablation: layer, expert|head (and
    ``to`` under swap), loss, base_loss, delta_loss (nats), kl (nats, baseline || ablated), n_tokens. Example::

        gv.analysis.ablation_sweep(model, None, mode="swap", swap_to=0, max_len=64)
    """
    _, mode = _check_kind(model.cfg, kind, mode)  # bad arguments fail before any data is read
    if mode == "swap":
        swap_targets(model.cfg, swap_to)
    layers = _layers(layers, model.cfg, kind)
    chunk = None if chunk is None else _chunk(chunk)
    if _is_token_batch(data):
        sums = ablation_sums(model, data, kind=kind, mode=mode, layers=layers, chunk=chunk, expert_impl=expert_impl,
                             swap_to=swap_to)
        return sums_to_frame(sums, kind)
    from .dataset import batches

    total = None
    for toks in batches(model, data, batch_size=batch_size, max_len=max_len, progress=progress,
                        desc=f"{kind} ablation sweep"):
        s = ablation_sums(model, toks, kind=kind, mode=mode, layers=layers, chunk=chunk, expert_impl=expert_impl,
                          swap_to=swap_to)
        if total is None:
            total = s
        else:
            for key in ("nll", "kl", "base_nll", "n_pred"):
                total[key] = total[key] + s[key]
    if total is None:
        raise ValueError("the dataset is empty")
    return sums_to_frame(total, kind)


def _is_token_batch(data) -> bool:
    if isinstance(data, (np.ndarray, jax.Array)):
        return True
    return False
