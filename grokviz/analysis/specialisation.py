"""Expert specialisation from routing captures: what each expert's tokens are made of (token classes, domains,
any grouping), how far its mix departs from its layer's, and the tokens it prefers.

Inputs are as in :mod:`grokviz.analysis.routing` (``experts`` = ``blocks.moe.top_k_experts`` [layer, batch, seq,
k]; ``real`` [batch, seq] bool or None). Counting functions are additive over batches (the dataset runners
stream them); the tables are built from the accumulated counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .routing import _check_ids, _layered, _real

__all__ = ["TOKEN_CLASSES", "token_class", "vocab_classes", "group_expert_counts", "specialisation",
           "expert_specialisation", "token_expert_counts", "top_tokens"]


TOKEN_CLASSES = ("whitespace", "punctuation", "digits", "keyword", "identifier", "word", "other")
_SPACE = "\u2581"  # SentencePiece's visible space


def token_class(piece: str) -> str:
    """Classify a token string (a SentencePiece piece, ``▁`` = space) into one of :data:`TOKEN_CLASSES`.

    * whitespace — only spaces / ``▁`` / tabs / newlines (indentation, line breaks);
    * punctuation — no letters or digits after stripping spaces (``(``, ``):``, ``==``, ``."``);
    * digits — only digits;
    * keyword — a Python keyword (``def``, ``return``, ``None``, ...);
    * identifier — code-like names: contain ``_``, mix letters and digits, or are camelCase;
    * word — other purely alphabetic pieces (with ``'`` or ``-`` allowed inside);
    * other — control tokens (``[PAD]``, ``<0x0A>`` byte fallbacks, ``<s>``) and mixtures."""
    import keyword

    if piece.startswith("<0x") and piece.endswith(">"):
        byte = int(piece[3:-1], 16)
        return "whitespace" if chr(byte) in " \t\n\r" else "other"
    if (piece.startswith("[") and piece.endswith("]") and piece[1:-1].isupper()) or \
            (piece.startswith("<") and piece.endswith(">") and len(piece) > 2):
        return "other"
    s = piece.replace(_SPACE, " ")
    core = s.strip()
    if not core:
        return "whitespace" if s else "other"
    if not any(c.isalnum() for c in core):
        return "punctuation"
    if core.isdigit():
        return "digits"
    if keyword.iskeyword(core):
        return "keyword"
    if core.replace("_", "a").isalnum() and not core[0].isdigit():
        has_alpha, has_digit = any(c.isalpha() for c in core), any(c.isdigit() for c in core)
        camel = any(a.islower() and b.isupper() for a, b in zip(core, core[1:]))
        if "_" in core or (has_alpha and has_digit) or camel:
            return "identifier"
        if core.isalpha():
            return "word"
    if core.replace("'", "").replace("-", "").isalpha():
        return "word"
    return "other"


def vocab_classes(pieces) -> np.ndarray:
    """int [vocab]: index into :data:`TOKEN_CLASSES` of each piece (e.g. ``[tok.id_to_piece(i) for i ...]``)."""
    return np.asarray([TOKEN_CLASSES.index(token_class(p)) for p in pieces], np.int64)


def _counts(counts, what="group") -> np.ndarray:
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 3:
        raise ValueError(f"counts must be [layer, {what}, expert], got shape {counts.shape}")
    return counts


def _names(names, n: int) -> list:
    names = list(names)
    if len(names) != n:
        raise ValueError(f"{len(names)} group names for {n} groups in the counts")
    return names


def group_expert_counts(experts, real, groups, num_groups: int, num_experts: int) -> np.ndarray:
    """[layer, group, expert] int64: routed token-slots (all k) per token group, padding excluded.

    ``groups``: int [batch, seq] group id per token (a token class, a domain per row broadcast over seq, ...)."""
    experts = _layered(experts, 1)
    real = _real(real, experts.shape[1:3])
    _check_ids(experts, num_experts, "expert", real)
    try:
        groups = np.broadcast_to(np.asarray(groups), real.shape)
    except ValueError:
        raise ValueError(f"groups of shape {np.shape(groups)} do not broadcast to [batch, seq] = "
                         f"{real.shape}") from None
    groups = _check_ids(groups[real], num_groups, "group")
    out = np.zeros((experts.shape[0], num_groups, num_experts), np.int64)
    for layer in range(experts.shape[0]):
        sel = experts[layer][real]  # [n, k]
        flat = np.repeat(groups, sel.shape[1]) * num_experts + sel.ravel()
        out[layer] = np.bincount(flat, minlength=num_groups * num_experts).reshape(num_groups, num_experts)
    return out


def specialisation(counts, names) -> pd.DataFrame:
    """Tidy table from [layer, group, expert] slot counts: what each expert's tokens are made of.

    Columns: layer, expert, group, count, share (P(group | routed to expert)), base (P(group) over all routed
    slots of the layer), lift (share / base; 1 = no preference), expert_share (P(expert | group); uniform is
    1/E)."""
    counts = _counts(counts)
    names = _names(names, counts.shape[1])
    n_layers, n_groups, n_exp = counts.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / counts.sum(1, keepdims=True)
        base = counts.sum(2, keepdims=True) / counts.sum((1, 2), keepdims=True)
        lift = share / base
        expert_share = counts / counts.sum(2, keepdims=True)
    layer, group, expert = np.meshgrid(np.arange(n_layers), np.arange(n_groups), np.arange(n_exp), indexing="ij")
    return pd.DataFrame({"layer": layer.ravel(), "expert": expert.ravel(),
                         "group": np.asarray(list(names), dtype=object)[group.ravel()],
                         "count": counts.ravel().astype(np.int64), "share": share.ravel(),
                         "base": np.broadcast_to(base, counts.shape).ravel(), "lift": lift.ravel(),
                         "expert_share": expert_share.ravel()}).sort_values(["layer", "expert", "group"],
                                                                             ignore_index=True)


def expert_specialisation(counts, names) -> pd.DataFrame:
    """One row per (layer, expert): how far its group mix departs from the layer's, sorted most specialised first.

    ``kl`` = KL(P(group | expert) || P(group)) in nats (0 = the expert sees the same mix as the layer);
    ``top_group`` the group with the largest lift among groups with at least 1% of the expert's slots, with its
    ``top_share`` and ``top_lift``."""
    counts = _counts(counts)
    names = np.asarray(_names(names, counts.shape[1]), dtype=object)
    rows = []
    for layer in range(counts.shape[0]):
        c = counts[layer]  # [group, expert]
        base = c.sum(1) / max(c.sum(), 1)
        for e in range(c.shape[1]):
            n = c[:, e].sum()
            if n == 0:
                rows.append((layer, e, 0, np.nan, None, np.nan, np.nan))
                continue
            p = c[:, e] / n
            nz = p > 0
            kl = float(np.sum(p[nz] * np.log(p[nz] / base[nz])))
            lift = np.where(p >= 0.01, p / np.where(base > 0, base, np.inf), -np.inf)
            g = int(np.argmax(lift))
            rows.append((layer, e, int(n), kl, names[g], float(p[g]), float(lift[g])))
    df = pd.DataFrame(rows, columns=["layer", "expert", "n_slots", "kl", "top_group", "top_share", "top_lift"])
    return df.sort_values("kl", ascending=False, ignore_index=True)


def token_expert_counts(experts, real, tokens, vocab_size: int, num_experts: int) -> np.ndarray:
    """[layer, vocab, expert] int64: routed token-slots per token id (all k slots), padding excluded."""
    experts = _layered(experts, 1)
    real = _real(real, experts.shape[1:3])
    _check_ids(np.broadcast_to(np.asarray(tokens), real.shape)[real], vocab_size, "token")
    return group_expert_counts(experts, real, np.asarray(tokens), vocab_size, num_experts)


def top_tokens(counts, k: int = 10, min_count: int = 5, pieces=None, top_k: int = 2) -> pd.DataFrame:
    """The vocabulary each expert prefers, from [layer, vocab, expert] slot counts (``top_k`` slots per token).

    For token v and expert e: ``share`` = fraction of v's occurrences that selected e (in any of the k slots; at
    most 1); ``lift`` = share over the fraction of all tokens that selected e (1 = the expert sees v at its base
    rate). Tokens seen fewer than ``min_count`` times are skipped. Returns the ``k`` highest-lift tokens per
    (layer, expert), ties broken by count: layer, expert, rank, token_id, token (the piece when ``pieces`` is
    given), freq (occurrences of v), count (occurrences of v routed to e), share, lift."""
    counts = _counts(counts, "vocab")
    if pieces is not None and len(pieces) < counts.shape[1]:
        raise ValueError(f"pieces has {len(pieces)} entries but the counts cover a vocabulary of {counts.shape[1]}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    rows = []
    for layer in range(counts.shape[0]):
        c = counts[layer]  # [vocab, expert]
        freq = c.sum(1) / top_k
        base = c.sum(0) / max(freq.sum(), 1)
        ok = freq >= min_count
        with np.errstate(invalid="ignore", divide="ignore"):
            share = c / freq[:, None]
            lift = share / base[None]
        for e in range(c.shape[1]):
            cand = np.flatnonzero(ok & (c[:, e] > 0))
            order = cand[np.lexsort((-c[cand, e], -lift[cand, e]))][:k]
            for r, v in enumerate(order):
                rows.append((layer, e, r, int(v), None if pieces is None else pieces[v], int(round(freq[v])),
                             int(c[v, e]), float(share[v, e]), float(lift[v, e])))
    return pd.DataFrame(rows, columns=["layer", "expert", "rank", "token_id", "token", "freq", "count", "share",
                                       "lift"])
