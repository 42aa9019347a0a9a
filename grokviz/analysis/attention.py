"""Per-head attention summaries from captures, padding excluded.

Inputs: ``pattern`` = ``blocks.attn.pattern`` [layer, batch, head, seq, kv_seq] (softmax probabilities);
``logits`` = ``blocks.attn.logits`` (pre-cap, same axes); ``real`` [batch, seq] bool (``run.real``; None = all
real). A single layer without the layer axis is accepted. Every statistic is a mean over *real query
positions*, and is computed from additive sums (:func:`attention_sums`) so that the dataset runner can stream
it. When maps were kept for some layers only (``AttentionSpec(layers=...)``), pass ``layers=`` to label rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["head_entropy", "first_token_attention", "previous_token_score", "cap_binding_share",
           "attention_sums", "sums_to_frame", "head_summary", "gqa_group_summary"]


def _layered(x, ndim):
    x = np.asarray(x)
    if x.ndim == ndim - 1:
        x = x[None]
    if x.ndim != ndim:
        raise ValueError(f"expected {ndim} axes (layer, batch, head, seq{', kv_seq' * (ndim == 5)}), "
                         f"got shape {x.shape}")
    return x


def _real(real, batch, seq):
    if real is None:
        return np.ones((batch, seq), bool)
    real = np.asarray(real).astype(bool)
    if real.shape != (batch, seq):
        raise ValueError(f"real has shape {real.shape}, expected [batch, seq] = {(batch, seq)}")
    return real


def _check_group_size(group_size, n_heads):
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1 \
            or n_heads % group_size:
        raise ValueError(f"group_size must be a positive int dividing the {n_heads} heads, got {group_size!r}")


def _first_real(real):
    return np.argmax(real, axis=1)  # [batch]: first real position (0 with right padding)


def _entropy_sum(pattern_or_entropy, real):
    x = np.asarray(pattern_or_entropy, np.float64)
    if x.ndim == 5:
        x = -np.sum(np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0), axis=-1)
    return np.einsum("lbht,bt->lh", x, real.astype(np.float64)), real.sum()


def attention_sums(pattern=None, real=None, logits=None, *, entropy=None, cap=30.0, frac=0.9) -> dict:
    """Additive sums per [layer, head] and their counts (see the module doc for the axes).

    Keys: entropy (over real queries), first_token / prev_token (over real queries after the row's first real
    token, and with a real previous token), cap_binding (over valid query-key entries: real query, real key,
    key <= query); each with ``n_<key>``."""
    out = {}
    if pattern is not None:
        p = _layered(pattern, 5).astype(np.float64)
        n_layers, b, h, t, s = p.shape
        real = _real(real, b, t)
        out["entropy"], out["n_entropy"] = _entropy_sum(p, real)
        first = _first_real(real)
        after_first = real & (np.arange(t)[None] > first[:, None])
        to_first = np.take_along_axis(p, first[None, :, None, None, None], axis=-1)[..., 0]  # [l,b,h,t]
        out["first_token"] = np.einsum("lbht,bt->lh", to_first, after_first)
        out["n_first_token"] = after_first.sum()
        has_prev = real[:, 1:] & real[:, :-1]  # query t >= 1 and key t - 1 both real
        prev = np.diagonal(p, offset=-1, axis1=3, axis2=4)  # [l,b,h,t-1]: pattern[t, t-1] for t = 1..
        out["prev_token"] = np.einsum("lbht,bt->lh", prev, has_prev)
        out["n_prev_token"] = has_prev.sum()
    elif entropy is not None:
        e = _layered(entropy, 4)
        real = _real(real, e.shape[1], e.shape[3])
        out["entropy"], out["n_entropy"] = _entropy_sum(e, real)
    if logits is not None:
        lg = np.abs(_layered(logits, 5))
        n_layers, b, h, t, s = lg.shape
        real = _real(real, b, t)
        valid = real[:, :, None] & real[:, None, :] & np.tri(t, s, dtype=bool)[None]  # [b, t, s]
        binding = lg >= frac * cap
        out["cap_binding"] = np.einsum("lbhts,bts->lh", binding.astype(np.float64), valid.astype(np.float64))
        out["n_cap_binding"] = valid.sum()
    return out


def sums_to_frame(sums: dict, layers=None, group_size: int | None = None) -> pd.DataFrame:
    """Tidy per-head table from (accumulated) :func:`attention_sums`: layer, head, kv_head, and each statistic."""
    stats = [k for k in ("entropy", "first_token", "prev_token", "cap_binding") if k in sums]
    if not stats:
        raise ValueError("no attention statistics were computed; give a pattern, an entropy or logits")
    n_layers, n_heads = np.shape(sums[stats[0]])
    layers = np.arange(n_layers) if layers is None else np.asarray(layers)
    if layers.shape != (n_layers,):
        raise ValueError(f"layers labels the {n_layers} layer(s) of the statistics, got {layers.tolist()}")
    _check_group_size(group_size, n_heads)
    lay, head = np.meshgrid(layers, np.arange(n_heads), indexing="ij")
    df = pd.DataFrame({"layer": lay.ravel(), "head": head.ravel()})
    if group_size:
        df["kv_head"] = df["head"] // group_size
    for k in stats:
        with np.errstate(invalid="ignore", divide="ignore"):
            df[k] = (np.asarray(sums[k], np.float64) / sums[f"n_{k}"]).ravel()
    return df


def head_entropy(pattern, real, *, entropy=None) -> np.ndarray:
    """[layer, head]: mean entropy (nats) of real queries' attention distributions, from the pattern or (with
    ``pattern=None``) from the cheap ``blocks.attn.entropy`` capture [layer, batch, head, seq]."""
    s = attention_sums(pattern, real) if pattern is not None else attention_sums(None, real, entropy=entropy)
    return s["entropy"] / s["n_entropy"]


def first_token_attention(pattern, real) -> np.ndarray:
    """[layer, head]: mean attention paid to the row's first real token (the attention-sink / BOS mass), over
    real queries after it (the first token's own query, which can only attend to itself, is left out)."""
    s = attention_sums(pattern, real)
    return s["first_token"] / s["n_first_token"]


def previous_token_score(pattern, real) -> np.ndarray:
    """[layer, head]: mean attention from each real query t >= 1 to key t - 1 (1 = a pure previous-token head)."""
    s = attention_sums(pattern, real)
    return s["prev_token"] / s["n_prev_token"]


def cap_binding_share(logits, real, cap: float = 30.0, frac: float = 0.9) -> np.ndarray:
    """[layer, head]: share of valid attention logits (real query, real causal key) whose pre-cap magnitude
    ``|blocks.attn.logits|`` is at least ``frac * cap``. At the default 27 the ``30 tanh(x/30)`` cap already
    shrinks a logit by over 20% (the cap "binds"); ``frac=1`` counts only logits past the cap itself."""
    s = attention_sums(None, real, logits, cap=cap, frac=frac)
    return s["cap_binding"] / s["n_cap_binding"]


def head_summary(pattern, real, logits=None, *, group_size: int | None = None, layers=None,
                 cap: float = 30.0, frac: float = 0.9) -> pd.DataFrame:
    """One row per (layer, head): entropy, first_token, prev_token (and cap_binding when ``logits`` are given);
    a kv_head column (GQA group: query head j uses kv head j // group_size) when ``group_size`` is given."""
    return sums_to_frame(attention_sums(pattern, real, logits, cap=cap, frac=frac), layers, group_size)


def gqa_group_summary(pattern, real, group_size: int, logits=None, *, layers=None) -> pd.DataFrame:
    """One row per (layer, kv_head): the mean and spread of its query heads' statistics, and
    ``pattern_similarity`` — mean cosine similarity between the attention rows of the heads sharing that kv head
    (over real queries; 1 = the group's heads attend identically)."""
    p = _layered(pattern, 5).astype(np.float64)
    real = _real(real, p.shape[1], p.shape[3])
    _check_group_size(group_size, p.shape[2])
    heads = head_summary(p, real, logits, group_size=group_size, layers=layers)
    stats = [c for c in ("entropy", "first_token", "prev_token", "cap_binding") if c in heads]
    g = heads.groupby(["layer", "kv_head"])[stats]
    df = g.mean().join(g.std(ddof=0).add_suffix("_spread")).reset_index()
    n_layers, b, h, t, s = p.shape
    grouped = p.reshape(n_layers, b, h // group_size, group_size, t, s)
    unit = grouped / np.maximum(np.linalg.norm(grouped, axis=-1, keepdims=True), 1e-12)
    cos = np.einsum("lbkgts,lbkhts->lbkght", unit, unit)  # [l,b,kv,g,g,t]
    iu = np.triu_indices(group_size, 1)
    pair = cos[:, :, :, iu[0], iu[1], :].mean(axis=3) if group_size > 1 else np.ones(cos.shape[:3] + (t,))
    sim = np.einsum("lbkt,bt->lk", pair, real) / max(real.sum(), 1)
    df["pattern_similarity"] = sim.ravel()
    return df
