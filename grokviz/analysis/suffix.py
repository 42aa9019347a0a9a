"""The pieces the sweeps share (:mod:`grokviz.analysis.patching`, :mod:`grokviz.analysis.ablation`): index
checks, the *suffix forward* (the model's own :func:`grokviz.model.run_blocks` from a captured residual stream,
with a traced ``start_layer`` so every start shares one compiled program, read out by the model's
:func:`grokviz.model.unembed`), and the language-model sums (next-token NLL and ``KL(baseline || variant)`` over
the prediction pairs, :func:`grokviz.analysis.common.prediction_pairs`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..model.transformer import run_blocks, unembed
from .common import next_token_kl, next_token_logprobs, prediction_pairs

__all__ = ["check_indices", "suffix_logits", "suffix_hidden", "lm_sums"]


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
