"""Routing fragility: how close each token is to a different expert selection, and how often the selection
actually flips under the perturbations a port or a release introduces (issue 16; the routers:
docs/families.md#routers, docs/grok1.md#moe; the int8 format: docs/grok1.md#checkpoint).

* **Top-k margin**: per token and MoE layer, ``p_(k) - p_(k+1)``, the gap between the k-th and (k+1)-th largest
  router probabilities (``blocks.moe.router_probs``; for the top-k-then-softmax families the selection is on
  the logits, whose order is the same). A small margin means a small push changes the selected set.
* **Selection flips**: the selected *set* (order ignored) differs from the baseline run's, under:

  - ``"bf16"`` activations: the residual stream, each sublayer's input and output, and the router logits are
    rounded to bfloat16 at every layer (callbacks on ``blocks.resid_pre``, ``attn.pre_norm``, ``attn.out``,
    ``resid_mid``, ``moe.pre_norm``, ``router_logits``, ``moe.out``), as a bf16 port stores them; weights and
    accumulation stay fp32;
  - ``"int8"`` weights: the matrices the Grok-1 release stores as int8 (attention q/k/v/o and the experts;
    docs/grok1.md#checkpoint: per output column and per block of input rows, 8 blocks for the row-parallel
    ``w_o``/``w_down``, 1 otherwise, bf16 scales, :class:`grokviz.params.Int8Weight`) quantised from a float
    model; a model that already holds int8 weights is compared against them dequantised and rounded to bf16
    (the bf16 port). Embeddings, norms and the router stay as they are, as in the release;
  - ``"noise"``: Gaussian noise added to the token embeddings (``embed.out``), per token of RMS ``noise_scale``
    times that token's embedding RMS (default 1e-2), drawn from ``jax.random.fold_in(jax.random.key(seed), i)``
    for the i-th batch;
  - or any :class:`grokviz.interventions.Interventions` given as a variant (e.g. a planted router bias).

The named variants and the baseline run as one compiled program per batch shape, made of the model's own parts
(:func:`grokviz.model.embed`, :func:`grokviz.model.run_blocks`; no readout, since only the routing is compared);
an Interventions variant runs through :meth:`grokviz.Model.run` (checked there).

:func:`routing_fragility` streams a dataset (:func:`grokviz.analysis.dataset.batches`) and returns a
:class:`Fragility` with the per-token frame and the per-layer summary; :func:`topk_margin` and
:func:`selection_flips` are the pure array functions it uses.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pandas as pd

from ..config import is_real
from ..params import Int8Weight, dense

__all__ = ["topk_margin", "selection_flips", "quantize_int8", "int8_params", "routing_fragility", "Fragility",
           "BF16_HOOKS", "VARIANTS"]

VARIANTS = ("bf16", "int8", "noise")
BF16_HOOKS = ("blocks.resid_pre", "blocks.attn.pre_norm", "blocks.attn.out", "blocks.resid_mid",
              "blocks.moe.pre_norm", "blocks.moe.router_logits", "blocks.moe.out")
#: the leaves the release stores as int8, and their row blocks (docs/grok1.md#checkpoint)
INT8_BLOCKS = {"w_q": 1, "w_k": 1, "w_v": 1, "w_o": 8, "w_gate": 1, "w_up": 1, "w_down": 8}


def topk_margin(probs, k: int) -> np.ndarray:
    """``[..., expert] -> [...]``: the k-th largest probability minus the (k+1)-th (NaN when there are only k
    experts). Example: ``topk_margin(run.cache["blocks.moe.router_probs"], model.cfg.top_k)``."""
    p = np.asarray(probs, np.float32)
    if not 1 <= k <= p.shape[-1]:
        raise ValueError(f"k must be in [1, {p.shape[-1]}] (the number of experts), got {k}")
    if k == p.shape[-1]:
        return np.full(p.shape[:-1], np.nan, np.float32)
    part = -np.partition(-p, (k - 1, k), axis=-1)  # descending at positions k-1 and k
    return part[..., k - 1] - part[..., k]


def selection_flips(experts_a, experts_b) -> np.ndarray:
    """``[..., k]`` expert ids twice -> bool ``[...]``: the selected sets differ (order within the top-k ignored).
    Example: ``selection_flips(base.cache["blocks.moe.top_k_experts"], other.cache["blocks.moe.top_k_experts"])``."""
    a, b = np.sort(np.asarray(experts_a), -1), np.sort(np.asarray(experts_b), -1)
    if a.shape != b.shape:
        raise ValueError(f"expert selections must have the same shape, got {a.shape} and {b.shape}")
    return np.any(a != b, axis=-1)


def quantize_int8(w, blocks: int = 1) -> Int8Weight:
    """A float matrix ``[..., in, out]`` as the release's int8: per output column and per block of ``in // blocks``
    input rows, scale = max |w| / 127 (stored as bf16), values round(w / scale) in [-127, 127]."""
    w = np.asarray(w, np.float32)
    rows = w.shape[-2]
    if rows % blocks:
        raise ValueError(f"{rows} input rows do not split into {blocks} blocks")
    wb = w.reshape(*w.shape[:-2], blocks, rows // blocks, w.shape[-1])
    scale = (np.abs(wb).max(axis=-2) / 127.0).astype(ml_dtypes.bfloat16)          # [..., nb, out]
    s = scale.astype(np.float32)
    q = np.clip(np.round(wb / np.where(s > 0, s, 1.0)[..., None, :]), -127, 127).astype(np.int8)
    return Int8Weight(weight=jnp.asarray(q.reshape(w.shape)), scales=jnp.asarray(scale))


def int8_params(params, blocks: dict = INT8_BLOCKS) -> dict:
    """``params`` with the release's int8 leaves quantised (:func:`quantize_int8`); leaves already int8 are
    dequantised and rounded to bf16 instead (the bf16 port of an int8 release)."""
    out = dict(params)
    out["blocks"] = dict(params["blocks"])
    for name, nb in blocks.items():
        leaf = out["blocks"].get(name)
        if leaf is None:
            continue
        if isinstance(leaf, Int8Weight):
            out["blocks"][name] = dense(leaf, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)
        else:
            out["blocks"][name] = quantize_int8(np.asarray(dense(leaf, jnp.float32)), nb)
    return out


def _to_bf16(value, layer):
    return value.astype(jnp.bfloat16).astype(value.dtype)


_BF16_CALLBACKS = {name: _to_bf16 for name in BF16_HOOKS}   # one function: one compiled program


@dataclasses.dataclass
class Fragility:
    """What :func:`routing_fragility` returns: ``tokens`` (one row per real token and MoE layer: window, position,
    token_id, token, layer, margin, one ``flip_<variant>`` bool column per variant) and ``layers`` (per MoE
    layer: mean_margin, median_margin, fragile (share of tokens with margin < ``threshold``), one ``flip_<variant>``
    rate column per variant, n_tokens)."""

    tokens: pd.DataFrame | None
    layers: pd.DataFrame
    variants: tuple
    threshold: float

    def most_fragile_layer(self, by: str | None = None) -> int:
        """The MoE layer with the highest flip rate under ``by`` (default: the mean over the variants)."""
        cols = [f"flip_{v}" for v in self.variants] if by is None else [f"flip_{by}"]
        return int(self.layers.loc[self.layers[cols].mean(axis=1).idxmax(), "layer"])


_TOPK, _PROBS = "blocks.moe.top_k_experts", "blocks.moe.router_probs"


@functools.partial(jax.jit, static_argnames=("cfg", "named"))
def _scan_batch(params, qparams, tokens, key, noise_scale, cfg, named):
    """The baseline's router probabilities and selections, and the selections of each named variant."""
    from ..model.transformer import embed, run_blocks

    h = embed(params, tokens, cfg)
    base = run_blocks(params, h, tokens, cfg, capture=frozenset({_TOPK, _PROBS})).cache
    out = {"probs": base[_PROBS], "base": base[_TOPK]}
    for name in named:
        if name == "bf16":
            out[name] = run_blocks(params, h, tokens, cfg, capture=frozenset({_TOPK}), callbacks=_BF16_CALLBACKS)
        elif name == "int8":
            out[name] = run_blocks(qparams, embed(qparams, tokens, cfg), tokens, cfg, capture=frozenset({_TOPK}))
        else:  # noise
            rms = jnp.sqrt(jnp.mean(jnp.square(h), -1, keepdims=True))
            noisy = h + noise_scale * rms * jax.random.normal(key, h.shape, h.dtype)
            out[name] = run_blocks(params, noisy, tokens, cfg, capture=frozenset({_TOPK}))
        out[name] = out[name].cache[_TOPK]
    return out


def _split_variants(variants):
    """(named variants in VARIANTS order of appearance, {name: Interventions}, all names in order)."""
    from ..interventions import Interventions

    named, custom, names = [], {}, []
    for v in variants:
        name, spec = (v if isinstance(v, tuple) and len(v) == 2 else (v, v))
        if isinstance(spec, Interventions) and isinstance(name, str):
            custom[name] = spec
        elif isinstance(spec, str) and spec in VARIANTS and name == spec:
            named.append(spec)
        else:
            raise ValueError(f"variants must be among {list(VARIANTS)} or (name, Interventions) pairs, got {v!r}")
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be distinct, got {names}")
    return tuple(named), custom, tuple(names)


def routing_fragility(model, data=None, *, variants=VARIANTS, noise_scale: float = 1e-2, seed: int = 0,
                      threshold: float = 0.01, batch_size: int = 16, max_len: int | None = None,
                      per_token: bool = True, progress: bool = True) -> Fragility:
    """Top-k margins and selection flips per token and MoE layer over a dataset (default: the bundled validation
    split), against a plain fp32 run of ``model``. ``variants``: names from :data:`VARIANTS` and/or
    ``(name, Interventions)`` pairs; ``noise_scale``: relative RMS of the embedding noise; ``threshold``: the
    margin below which a token counts as fragile in the summary; ``per_token=False`` keeps only the summary
    (bounded memory). Example::

        fr = gv.analysis.routing_fragility(model, None, max_len=128)
        fr.layers                     # per MoE layer: margins, fragile share, flip rates
        fr.most_fragile_layer()
    """
    from .dataset import batches

    cfg = model.cfg
    if not (np.isfinite(noise_scale) and noise_scale >= 0):
        raise ValueError(f"noise_scale must be finite and >= 0, got {noise_scale!r}")
    variants = (variants,) if isinstance(variants, str) else tuple(variants)
    named, custom, names = _split_variants(variants)
    qparams = int8_params(model.params) if "int8" in named else model.params
    key0 = jax.random.key(seed)
    moe = list(cfg.moe_layer_ids)
    M = len(moe)
    sums = {"margin": np.zeros(M), "fragile": np.zeros(M), **{n: np.zeros(M) for n in names}}
    margins_all, frames, n_tok, window0 = [], [], 0, 0
    for i, toks in enumerate(batches(model, data, batch_size=batch_size, max_len=max_len, progress=progress,
                                     desc="routing fragility")):
        got = jax.device_get(_scan_batch(model.params, qparams, jnp.asarray(toks), jax.random.fold_in(key0, i),
                                         jnp.float32(noise_scale), cfg, named))
        real = np.asarray(is_real(toks, cfg.pad_token))                                   # [b, t]
        margin = topk_margin(got["probs"], cfg.top_k)                                     # [m, b, t]
        ex = got["base"]
        flips = {n: selection_flips(ex, got[n]) for n in named}
        for n, iv in custom.items():
            flips[n] = selection_flips(ex, model.run(toks, capture=[_TOPK], interventions=iv).cache[_TOPK])
        sums["margin"] += (margin * real).sum((1, 2))
        sums["fragile"] += ((margin < threshold) & real).sum((1, 2))
        for n in names:
            sums[n] += (flips[n] & real).sum((1, 2))
        margins_all.append(margin[:, real])
        n_tok += int(real.sum())
        if per_token:
            rows, pos = np.nonzero(real)
            ids = toks[rows, pos]
            for m, layer in enumerate(moe):
                frames.append(pd.DataFrame({"window": rows + window0, "position": pos, "token_id": ids,
                                            "layer": layer, "margin": margin[m][rows, pos],
                                            **{f"flip_{n}": flips[n][m][rows, pos] for n in names}}))
        window0 += int(real.any(1).sum())
    if n_tok == 0:
        raise ValueError("the dataset is empty")
    med = np.median(np.concatenate(margins_all, axis=1), axis=1)
    layers = pd.DataFrame({"layer": moe, "mean_margin": sums["margin"] / n_tok, "median_margin": med,
                           "fragile": sums["fragile"] / n_tok, **{f"flip_{n}": sums[n] / n_tok for n in names},
                           "n_tokens": n_tok})
    tokens = None
    if per_token:
        tokens = pd.concat(frames, ignore_index=True).sort_values(["window", "layer", "position"], ignore_index=True)
        tok = model.tokenizer
        if tok is not None:
            uniq = np.unique(tokens["token_id"].to_numpy())
            piece = {int(i): tok.id_to_piece(int(i)) for i in uniq}
            tokens.insert(3, "token", tokens["token_id"].map(piece))
    return Fragility(tokens, layers, names, float(threshold))
