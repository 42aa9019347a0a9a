"""Experiments: ablation sweeps over every (layer, expert) or (layer, head), and activation / routing patching
between two prompts across layers and positions, returned as tidy tables.

Both reuse the unchanged prefix. A change at layer ``l`` cannot affect layers before it, so the baseline (or
corrupt) run is made once with ``blocks.resid_pre`` captured, and each variant runs only layers ``l .. L-1``
starting from the captured residual stream: one compiled *suffix forward* (the model's own
:func:`grokviz.model.run_blocks` with a traced ``start_layer``: layers before it are skipped by ``lax.cond``, so
every layer shares one compilation), ``vmap``-ped over the variants of a layer, read out by the model's
:func:`grokviz.model.unembed`. Sweeping E experts over L layers thus costs about
``E * L * (L + 1) / 2`` layer evaluations, batched, instead of ``E * L * L`` in ``E * L`` separate forwards.

Language-model metrics use next-token prediction at positions ``t`` where tokens ``t`` and ``t + 1`` are both
real (:func:`grokviz.analysis.common.prediction_pairs`): ``loss`` is the mean cross-entropy (nats), ``kl`` the
mean ``KL(baseline || ablated)`` of the next-token
distributions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..hooks import REGISTRY
from ..model.block import sublayer_write
from ..model.transformer import forward, run_blocks, unembed
from .common import last_real_position, next_token_kl, next_token_logprobs, prediction_pairs, token_id

__all__ = ["ablation_sweep", "ablation_sums", "swap_targets", "separate_ablation_sums", "patch_sweep",
           "activation_patching", "routing_patching", "lm_sums", "suffix_logits"]


# ----------------------------------------------------------------------------------------------- core
def check_indices(name: str, values, n: int) -> list[int]:
    """``values`` (ints, negative counting from the end) as indices in ``[0, n)``; ``ValueError`` naming
    ``name`` and the bound otherwise."""
    out = []
    for v in np.atleast_1d(np.asarray(values)).tolist():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be integers, got {v!r}")
        if not -n <= v < n:
            raise ValueError(f"{name} contains {v}, outside [-{n}, {n})")
        out.append(v % n)
    return out


def _layers(layers, cfg, kind="head") -> list[int]:
    """The layers of a sweep: default every layer (every MoE layer for experts); an expert sweep at a dense MLP
    layer is refused."""
    if layers is None:
        return list(cfg.moe_layer_ids) if kind == "expert" else list(range(cfg.num_layers))
    out = check_indices("layers", layers, cfg.num_layers)
    dense = [l for l in out if kind == "expert" and not cfg.is_moe(l)]
    if dense:
        raise ValueError(f"layer {dense[0]} is a dense MLP layer without experts (MoE layers: "
                         f"{list(cfg.moe_layer_ids)})")
    return out


def suffix_logits(params, cfg, tokens, h0, start, iv_layers=None, patches=None, expert_impl="sparse"):
    """Logits of the model run from layer ``start`` on, with ``h0`` [batch, seq, d_model] as ``resid_pre[start]``
    (``start = num_layers``: no layer runs, ``h0`` is read out).

    ``iv_layers``: the per-layer dict of :meth:`Interventions.split` (arrays with a leading layer axis) or None;
    ``patches``: {blocks hook name: (value [layer, ...], mask [layer, batch, seq])} applied inside the blocks.
    Pure and traceable; ``start`` may be a traced int."""
    return unembed(params, suffix_hidden(params, cfg, tokens, h0, start, iv_layers, patches, expert_impl), cfg)


def suffix_hidden(params, cfg, tokens, h0, start, iv_layers=None, patches=None, expert_impl="sparse"):
    """The residual stream leaving the last layer, running layers ``start ..`` from ``h0`` (see suffix_logits)."""
    if isinstance(start, (int, np.integer)):
        start = jnp.int32(start)  # traced: every start shares one compiled program
    return run_blocks(params, h0, tokens, cfg, start_layer=start, interventions=iv_layers, patches=patches,
                      expert_impl=expert_impl).h


def lm_sums(logits, tokens, pad_token, base_logits=None):
    """(sum of next-token NLL, sum of KL(base || logits), number of predictions) over the prediction pairs."""
    valid = prediction_pairs(tokens, pad_token).astype(jnp.float32)
    nll = -next_token_logprobs(logits, tokens)
    kl = jnp.zeros_like(nll) if base_logits is None else next_token_kl(base_logits, logits)
    return jnp.sum(nll * valid), jnp.sum(kl * valid), jnp.sum(valid)


def _base_terms(logits, tokens, pad_token):
    """Per-batch constants of the baseline for :func:`_loss_sums`: p = softmax, c = sum p log p, valid."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    return {"p": p, "c": jnp.sum(p * logp, -1), "valid": prediction_pairs(tokens, pad_token).astype(jnp.float32)}


def _loss_sums(logits, tokens, base):
    """(sum NLL, sum KL(base || logits)) without materialising log-probabilities:
    ``nll = lse - z[target]``, ``KL = sum p log p - sum p z + lse``."""
    z = logits[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    nll = lse - jnp.take_along_axis(z, tokens[:, 1:, None], axis=-1)[..., 0]
    kl = base["c"] - jnp.sum(base["p"] * z, -1) + lse
    return jnp.sum(nll * base["valid"]), jnp.sum(kl * base["valid"])


_lm_sums_jit = jax.jit(lm_sums, static_argnums=2)

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


# ----------------------------------------------------------------------------------------------- ablations
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


# ----------------------------------------------------------------------------------------------- patching
def _metric(logits, rows, pos, target, foil):
    last = jnp.asarray(logits)[rows, pos].astype(jnp.float32)  # [batch, vocab]
    return _metric_last(last, rows, target, foil)


def _metric_last(last, rows, target, foil):
    if foil is None:
        m = jax.nn.log_softmax(last, axis=-1)[rows, target]
    else:
        m = last[rows, target] - last[rows, foil]
    return jnp.mean(m)


@functools.partial(jax.jit, static_argnames=("cfg", "name", "expert_impl"))
def _patch_layer(params, tokens, h0, value, masks, start, target, foil, pos, cfg, name, expert_impl):
    rows = jnp.arange(tokens.shape[0])

    def one(mask):
        if name == "blocks.resid_pre":  # patch the stream entering `start` directly
            h = jnp.where(mask[start][..., None], value[start], h0)
            h = suffix_hidden(params, cfg, tokens, h, start, None, None, expert_impl)
        else:
            h = suffix_hidden(params, cfg, tokens, h0, start, None, {name: (value, mask)}, expert_impl)
        last = unembed(params, h[rows, pos][:, None], cfg)[:, 0]  # read out the metric positions only
        return _metric_last(last, rows, target, foil)

    return jax.vmap(one)(masks)


def patch_sweep(model, clean, corrupt, *, hook="blocks.resid_pre", target, foil=None, layers=None,
                positions=None, expert_impl="sparse") -> pd.DataFrame:
    """Patch ``hook`` from the clean run into the corrupt run at one (layer, position) at a time.

    ``clean`` and ``corrupt``: prompts (text or token ids) of the same shape. The metric is read at each row's
    last real token: ``logit[target] - logit[foil]`` if ``foil`` is given, else ``log p(target)`` (``target``,
    ``foil``: token ids, scalars or one per row; text is encoded as a single token). Returns layer, position,
    metric, and ``recovered = (metric - corrupt) / (clean - corrupt)`` (1: the patch restores the clean
    behaviour), with ``clean_metric``/``corrupt_metric`` columns. ``hook``: any ``blocks.*`` hook with a seq axis
    (``blocks.resid_pre``, ``blocks.resid_mid``, ``blocks.attn.out``, ``blocks.moe.out``, ...;
    ``blocks.moe.top_k_experts`` is routing patching)."""
    cfg, params = model.cfg, model.params
    if hook not in REGISTRY or not REGISTRY[hook].per_layer or "seq" not in REGISTRY[hook].axes:
        raise ValueError(f"hook must be a blocks.* hook with a seq axis, got {hook!r}")
    clean_t, corrupt_t = model.to_tokens(clean), model.to_tokens(corrupt)
    if clean_t.shape != corrupt_t.shape:
        raise ValueError(f"clean and corrupt prompts must have the same token shape, got {clean_t.shape} and "
                         f"{corrupt_t.shape}; pad or rephrase them")
    b, t = corrupt_t.shape
    target, foil = _token_ids(model, target, b, "target"), None if foil is None else _token_ids(model, foil, b, "foil")
    layers = _layers(layers, cfg)
    positions = list(range(t)) if positions is None else check_indices("positions", positions, t)
    pos = jnp.asarray(last_real_position(corrupt_t, cfg.pad_token))
    rows = jnp.arange(b)
    capture = sorted({hook, "blocks.resid_pre"})  # one compiled program for both runs
    clean_run = model.run(clean_t, capture=capture, expert_impl=expert_impl)
    corrupt_run = model.run(corrupt_t, capture=capture, expert_impl=expert_impl)
    clean_pos = jnp.asarray(last_real_position(clean_t, cfg.pad_token))
    m_clean = float(_metric(clean_run.logits, rows, clean_pos, target, foil))
    m_corrupt = float(_metric(corrupt_run.logits, rows, pos, target, foil))
    value = clean_run.cache[hook]
    rows_out = []
    for layer in layers:
        masks = np.zeros((len(positions), cfg.num_layers, b, t), bool)
        masks[np.arange(len(positions)), layer, :, positions] = True
        ms = _patch_layer(params, jnp.asarray(corrupt_t), corrupt_run.cache["blocks.resid_pre"][layer], value,
                          jnp.asarray(masks), jnp.int32(layer), target, foil, pos, cfg, hook, expert_impl)
        for p, m in zip(positions, np.asarray(ms)):
            rows_out.append((layer, p, float(m)))
    df = pd.DataFrame(rows_out, columns=["layer", "position", "metric"])
    denom = m_clean - m_corrupt
    df["recovered"] = (df["metric"] - m_corrupt) / denom if denom != 0 else np.nan
    df["clean_metric"], df["corrupt_metric"] = m_clean, m_corrupt
    return df


def activation_patching(model, clean, corrupt, *, hook="blocks.resid_pre", **kw) -> pd.DataFrame:
    """:func:`patch_sweep` of an activation (default the residual stream entering each layer)."""
    return patch_sweep(model, clean, corrupt, hook=hook, **kw)


def routing_patching(model, clean, corrupt, **kw) -> pd.DataFrame:
    """:func:`patch_sweep` of the routing decision: the corrupt run's tokens at (layer, position) are sent to the
    clean run's experts (gates become the corrupt router's probabilities for those experts)."""
    return patch_sweep(model, clean, corrupt, hook="blocks.moe.top_k_experts", **kw)


def _token_ids(model, tok, batch, name):
    """``tok`` (a one-token string, an id, or one id per row) as int32 [batch]; ids checked by ``token_id``."""
    if isinstance(tok, str) or np.ndim(tok) == 0:
        return jnp.full((batch,), token_id(model, tok if isinstance(tok, str) else int(tok)), jnp.int32)
    ids = np.asarray(tok)
    if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be one token (id or text) or {batch} integer ids (one per row), "
                         f"got {ids.dtype} shape {ids.shape}")
    return jnp.asarray([token_id(model, int(i)) for i in ids], jnp.int32)
