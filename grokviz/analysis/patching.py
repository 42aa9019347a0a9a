"""Experiments: activation / routing patching between two prompts across layers and positions, returned as tidy
tables; and, re-exported from :mod:`grokviz.analysis.ablation`, the ablation sweeps over every (layer, expert) or
(layer, head).

Both reuse the unchanged prefix. A change at layer ``l`` cannot affect layers before it, so the corrupt (or
baseline) run is made once with ``blocks.resid_pre`` captured, and each variant runs only layers ``l .. L-1``
starting from the captured residual stream: one compiled *suffix forward* (:mod:`grokviz.analysis.suffix`: the
model's own :func:`grokviz.model.run_blocks` with a traced ``start_layer``: layers before it are skipped by
``lax.cond``, so every layer shares one compilation), ``vmap``-ped over the variants of a layer, read out by the
model's :func:`grokviz.model.unembed`.

The patching metric is read at each row's last real token: ``log p(target)``, or ``logit[target] -
logit[foil]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..hooks import REGISTRY
from ..model.transformer import unembed

# the ablation sweeps (.ablation) and the pieces the sweeps share (.suffix) have their own modules; every name
# stays importable from here
from .ablation import ablation_sums, ablation_sweep, separate_ablation_sums, sums_to_frame, swap_targets
from .common import last_real_position, token_id
from .suffix import _layers, _lm_sums_jit, check_indices, lm_sums, suffix_hidden, suffix_logits  # noqa: F401

__all__ = ["ablation_sweep", "ablation_sums", "swap_targets", "separate_ablation_sums", "sums_to_frame",
           "patch_sweep", "activation_patching", "routing_patching", "lm_sums", "suffix_logits", "check_indices"]


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
