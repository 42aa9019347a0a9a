"""Dataset runners: iterate over many texts in fixed-shape batches, aggregate streaming statistics in bounded
memory (sums and counts only, never per-token arrays), with a ``tqdm.auto`` progress bar.

``data`` may be: ``None`` (the bundled corpus's validation split), a list/iterable of strings, of dicts with
``"text"`` (and optionally ``"domain"``), of token-id sequences, or a 2-D token array. Texts are encoded with the
model's tokenizer, and documents longer than ``max_len`` (default: the model's ``sequence_len``) are cut into
consecutive windows. Batches always have ``batch_size`` rows (the last one is filled with padding rows) and a
length bucketed to a power of two, so a whole dataset compiles only a few programs.

    stats = routing_stats(model)                      # the validation split
    stats.summary()                                   # per-layer table with random baselines
    stats.expert_specialisation("class").head()       # most specialised experts by token class
    stats.top_tokens(k=5)                             # what each expert prefers
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd

from ..api import bucket_length
from ..config import is_real
from . import attention as A
from . import routing as R
from . import specialisation as S

__all__ = ["default_dataset", "batches", "routing_stats", "attention_stats", "RoutingStats", "AttentionStats"]


def default_dataset(split: str = "validation") -> list[dict]:
    """The bundled corpus's documents of ``split`` (dicts with ``text`` and ``domain``; see grokviz/corpus)."""
    from ..corpus import load

    return load(split=split)


def _items(data) -> Iterable:
    if data is None:
        return default_dataset("validation")
    if isinstance(data, str):
        return [data]
    if isinstance(data, np.ndarray) and data.ndim == 2:
        return list(data)
    return data


def _encode(model, item) -> tuple[np.ndarray, object]:
    """(token ids 1-D int32 without padding, domain label or None)."""
    domain = None
    if isinstance(item, dict):
        domain = item.get("domain")
        item = item["text"] if "text" in item else item["tokens"]
    if isinstance(item, str):
        if model.tokenizer is None:
            raise ValueError("texts need a model with a tokenizer; pass token ids instead")
        ids = np.asarray(model.tokenizer.encode(item), np.int32)
    else:
        ids = np.asarray(item, np.int32).ravel()
        ids = ids[is_real(ids, model.cfg.pad_token)]
    return ids, domain


def batches(model, data=None, *, batch_size: int = 8, max_len: int | None = None, progress: bool = True,
            desc: str | None = None, with_domains: bool = False, min_tokens: int = 2) -> Iterator:
    """Yield int32 token batches [batch_size, bucket] (right-padded), or ``(tokens, domains)`` with
    ``with_domains`` (one label per row, None for filler rows). Windows shorter than ``min_tokens`` are skipped."""
    from tqdm.auto import tqdm

    max_len = model.cfg.sequence_len if max_len is None else max_len
    for name, v, lo, hi in (("batch_size", batch_size, 1, None), ("max_len", max_len, 1, model.cfg.sequence_len),
                            ("min_tokens", min_tokens, 1, None)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
            bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"{name} must be an int {bound}, got {v!r}")
    items = _items(data)
    total = len(items) if hasattr(items, "__len__") else None
    bar = tqdm(items, total=total, desc=desc or "documents", disable=not progress, leave=True)
    rows: list = []
    for item in bar:
        ids, domain = _encode(model, item)
        for lo in range(0, len(ids), max_len):
            window = ids[lo:lo + max_len]
            if len(window) >= min_tokens:
                rows.append((window, domain))
            if len(rows) == batch_size:
                yield _pack(rows, batch_size, max_len, model.cfg.pad_token, with_domains)
                rows = []
    if rows:
        yield _pack(rows, batch_size, max_len, model.cfg.pad_token, with_domains)


def _pack(rows, batch_size, max_len, pad, with_domains):
    width = bucket_length(max(len(r) for r, _ in rows), max_len)  # the buckets Model.run uses
    out = np.full((batch_size, width), pad, np.int32)
    for i, (r, _) in enumerate(rows):
        out[i, :len(r)] = r
    if with_domains:
        return out, [d for _, d in rows] + [None] * (batch_size - len(rows))
    return out


# ----------------------------------------------------------------------------------------------- routing
@dataclasses.dataclass
class RoutingStats:
    """Streaming routing aggregates over a dataset (all counts are padding-free token-slot counts)."""

    num_experts: int
    top_k: int
    load: np.ndarray            # [layer, expert]
    coactivation: np.ndarray    # [layer, expert, expert]
    consecutive: np.ndarray     # [layer, 3]: first repeats, top-k overlaps, pairs
    flow: np.ndarray            # [layer - 1, expert, expert] first choice l -> l + 1
    sums: dict                  # entropy, gate_mass, z_loss: [layer] sums over tokens; prob: [layer, expert]
    n_tokens: int
    class_counts: np.ndarray | None   # [layer, class, expert]
    token_counts: np.ndarray | None   # [layer, vocab, expert]
    domain_counts: dict               # domain -> [layer, expert]
    pieces: list | None = None

    def summary(self) -> pd.DataFrame:
        """Per layer: load CV (and its random-routing baseline), entropy, gate mass, aux and z losses, and the
        consecutive-token rates next to their analytic baselines."""
        n = max(self.n_tokens, 1)
        mean_load = self.load.mean(1)
        share = self.load / np.maximum(self.load.sum(1, keepdims=True), 1)
        p_mean = self.sums["prob"] / n
        rates = R._rates_frame(self.consecutive)
        base = R.consecutive_baselines(self.num_experts, self.top_k)
        df = pd.DataFrame({
            "layer": np.arange(len(self.load)),
            "load_cv": self.load.std(1) / np.where(mean_load > 0, mean_load, np.nan),
            "load_cv_random": R.load_baseline_cv(n, self.num_experts, self.top_k),
            "entropy": self.sums["entropy"] / n, "entropy_max": np.log(self.num_experts),
            "gate_mass": self.sums["gate_mass"] / n,
            "switch_aux_loss": self.num_experts * (share * p_mean).sum(1),
            "router_z_loss": self.sums["z_loss"] / n,
            "first_repeat": rates["first_repeat"], "first_repeat_random": base["first_repeat"],
            "topk_overlap": rates["topk_overlap"], "topk_overlap_random": base["topk_overlap"],
            "n_tokens": self.n_tokens, "n_pairs": rates["n_pairs"]})
        return df

    def consecutive_rates(self) -> pd.DataFrame:
        return R._rates_frame(self.consecutive)

    def load_share(self) -> np.ndarray:
        return self.load / np.maximum(self.load.sum(1, keepdims=True), 1)

    def paths(self) -> pd.DataFrame:
        """Tidy first-choice flows between adjacent layers (see :func:`routing.routing_paths`)."""
        return R.paths_frame(self.flow)

    def _groups(self, by):
        if by == "class":
            if self.class_counts is None:
                raise ValueError("token classes need a tokenizer (the model had none)")
            return self.class_counts, S.TOKEN_CLASSES
        if by == "domain":
            names = sorted(self.domain_counts)
            if not names:
                raise ValueError("no domain labels in this dataset (give dicts with a 'domain' field)")
            return np.stack([self.domain_counts[d] for d in names], axis=1), names
        raise ValueError(f"by must be 'class' or 'domain', got {by!r}")

    def specialisation(self, by: str = "class") -> pd.DataFrame:
        """Tidy (layer, expert, group) table of :func:`routing.specialisation`; ``by``: "class" or "domain"."""
        return S.specialisation(*self._groups(by))

    def expert_specialisation(self, by: str = "class") -> pd.DataFrame:
        """Per (layer, expert) KL of its group mix from the layer's, most specialised first."""
        return S.expert_specialisation(*self._groups(by))

    def top_tokens(self, k: int = 10, min_count: int = 5) -> pd.DataFrame:
        if self.token_counts is None:
            raise ValueError("per-token counts were not collected (token_stats=False)")
        return S.top_tokens(self.token_counts, k=k, min_count=min_count, pieces=self.pieces, top_k=self.top_k)


def routing_stats(model, data=None, *, batch_size: int = 8, max_len: int | None = None, token_stats: bool = True,
                  progress: bool = True, expert_impl: str = "sparse") -> RoutingStats:
    """Run ``model`` over ``data`` (default: the bundled validation split) and aggregate routing statistics.

    Memory is bounded by the counters: O(layer * expert**2), plus O(layer * vocab * expert) with
    ``token_stats`` (per-token preferences; turn off for a 131k vocabulary if that matters)."""
    cfg = model.cfg
    L, E, k = cfg.num_layers, cfg.num_experts, cfg.top_k
    tok = model.tokenizer
    pieces = [tok.id_to_piece(i) for i in range(cfg.vocab_size)] if tok is not None else None
    classes = S.vocab_classes(pieces) if pieces is not None else None
    st = RoutingStats(E, k, np.zeros((L, E), np.int64), np.zeros((L, E, E), np.int64), np.zeros((L, 3), np.int64),
                      np.zeros((max(L - 1, 0), E, E), np.int64),
                      {"entropy": np.zeros(L), "gate_mass": np.zeros(L), "z_loss": np.zeros(L),
                       "prob": np.zeros((L, E))}, 0,
                      None if classes is None else np.zeros((L, len(S.TOKEN_CLASSES), E), np.int64),
                      np.zeros((L, cfg.vocab_size, E), np.int64) if token_stats else None, {}, pieces)
    capture = ["blocks.moe.top_k_experts", "blocks.moe.router_probs", "blocks.moe.router_logits",
               "blocks.moe.top_k_weights"]
    for toks, domains in batches(model, data, batch_size=batch_size, max_len=max_len, progress=progress,
                                 desc="routing statistics", with_domains=True):
        run = model.run(toks, capture=capture, expert_impl=expert_impl)
        c = {name: np.asarray(run.cache[name]) for name in capture}
        _update_routing(st, c, toks, np.asarray(run.real), domains, classes)
    return st


def _update_routing(st: RoutingStats, c, toks, real, domains, classes):
    ex, E = c["blocks.moe.top_k_experts"], st.num_experts
    n = int(real.sum())
    st.n_tokens += n
    st.load += R.expert_load(ex, real, E)
    st.coactivation += R.coactivation(ex, real, E)
    st.consecutive += R.consecutive_counts(ex, real)
    for layer in range(len(st.flow)):
        st.flow[layer] += R.routing_flow(ex, real, layer, E)
    st.sums["entropy"] += R.routing_entropy(c["blocks.moe.router_probs"], real) * n
    st.sums["gate_mass"] += R.gate_mass(c["blocks.moe.top_k_weights"], real) * n
    st.sums["z_loss"] += R.router_z_loss(c["blocks.moe.router_logits"], real) * n
    st.sums["prob"] += np.einsum("lbte,bt->le", c["blocks.moe.router_probs"].astype(np.float64), real)
    if st.class_counts is not None:
        st.class_counts += S.group_expert_counts(ex, real, classes[toks], len(S.TOKEN_CLASSES), E)
    if st.token_counts is not None:
        st.token_counts += S.token_expert_counts(ex, real, toks, st.token_counts.shape[1], E)
    for d in set(domains) - {None}:
        rows = np.asarray([x == d for x in domains])
        cnt = R.expert_load(ex, real & rows[:, None], E)
        st.domain_counts[d] = st.domain_counts.get(d, 0) + cnt


# ----------------------------------------------------------------------------------------------- attention
@dataclasses.dataclass
class AttentionStats:
    sums: dict
    group_size: int

    def summary(self) -> pd.DataFrame:
        """Per (layer, head): entropy, first_token, prev_token, cap_binding, with the kv_head (GQA group)."""
        return A.sums_to_frame(self.sums, group_size=self.group_size)

    def groups(self) -> pd.DataFrame:
        """Per (layer, kv_head): group means of the per-head statistics."""
        df = self.summary()
        stats = [c for c in ("entropy", "first_token", "prev_token", "cap_binding") if c in df]
        return df.groupby(["layer", "kv_head"])[stats].mean().reset_index()


def attention_stats(model, data=None, *, batch_size: int = 4, max_len: int | None = None, cap_frac: float = 0.9,
                    progress: bool = True) -> AttentionStats:
    """Per-head attention statistics aggregated over a dataset (default: the bundled validation split)."""
    cfg = model.cfg
    total: dict = {}
    for toks in batches(model, data, batch_size=batch_size, max_len=max_len, progress=progress,
                        desc="attention statistics"):
        run = model.run(toks, capture=["blocks.attn.pattern", "blocks.attn.logits"])
        s = A.attention_sums(np.asarray(run.cache["blocks.attn.pattern"]), run.real,
                             np.asarray(run.cache["blocks.attn.logits"]), cap=cfg.attn_softcap, frac=cap_frac)
        for key, v in s.items():
            total[key] = total.get(key, 0) + v
    return AttentionStats(total, cfg.group_size)
