"""Detect then steer: which experts one set of texts uses more than another, and a router-bias intervention built
from them (the recipe of SteerMoE, Fayyaz et al. 2025, "Steering MoE LLMs via Expert (De)Activation",
arXiv:2509.09660: per-expert activation-rate differences between paired behaviours, then (de)activating the top
experts at inference; the idea is theirs, this code is ours). See docs/analysis.md#steering.

    det = detect(model, texts_a, texts_b)              # default: code vs prose from the bundled corpus
    det.table.head()                                    # ranked (layer, expert) with 95 % intervals
    iv = det.interventions(n=2, strength=4.0)           # + bias on the top a-experts, - on the top b-experts
    steering_effect(model, iv, held_a, held_b)          # activation rates and mean log p, with/without
    steered_generation(model, prompts, iv, 24)          # continuations with/without

**Activation rate** of expert ``e`` at MoE layer ``l`` over a set of texts: the fraction of its real tokens whose
top-k includes ``e`` (each token counts once). **Interval**: Newcombe's hybrid score interval for the
difference of two independent proportions (R. G. Newcombe, "Interval estimation for the difference between
independent proportions: comparison of eleven methods", Statistics in Medicine 17:873-890, 1998, method 10),
built from the two Wilson score intervals (E. B. Wilson, JASA 22:209-212, 1927). It treats tokens as independent
draws; tokens of one document are not, so read it as a lower bound on the uncertainty (more documents, not more
tokens of one document, narrow it honestly).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from ..config import is_real
from ..interventions import Interventions
from . import routing as R
from .dataset import batches, default_dataset

__all__ = ["ActivationCounts", "Detection", "activation_counts", "compare_counts", "default_sets", "detect",
           "detect_tokens", "effect_summary", "newcombe_interval", "relative_logprob_shift", "steered_generation",
           "steering_bias", "steering_effect", "wilson_interval"]

EXPERTS = "blocks.moe.top_k_experts"


# ------------------------------------------------------------------------------------------------ statistics
def wilson_interval(k, n, z: float = 1.959963984540054):
    """Wilson score interval (lo, hi) for a proportion ``k / n`` (arrays broadcast; n = 0 gives (0, 1))."""
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    safe = np.maximum(n, 1)
    p = k / safe
    denom = 1 + z * z / safe
    centre = (p + z * z / (2 * safe)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe))
    lo, hi = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    return np.where(n > 0, lo, 0.0), np.where(n > 0, hi, 1.0)


def newcombe_interval(k_a, n_a, k_b, n_b, z: float = 1.959963984540054):
    """Newcombe's hybrid score interval (lo, hi) for ``k_a / n_a - k_b / n_b`` (method 10 of Newcombe 1998)."""
    pa = np.asarray(k_a, np.float64) / max(int(n_a), 1)
    pb = np.asarray(k_b, np.float64) / max(int(n_b), 1)
    la, ua = wilson_interval(k_a, n_a, z)
    lb, ub = wilson_interval(k_b, n_b, z)
    d = pa - pb
    return d - np.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + np.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)


def _z_of(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


# ------------------------------------------------------------------------------------------------ counting
@dataclasses.dataclass
class ActivationCounts:
    """``active`` [moe layer, expert]: tokens whose top-k includes the expert; ``n_tokens``: real tokens counted;
    ``layers``: the layer number of each row."""

    active: np.ndarray
    n_tokens: int
    layers: tuple

    def rates(self) -> np.ndarray:
        return self.active / max(self.n_tokens, 1)


def _moe_rows(cfg) -> tuple:
    return tuple(int(l) for l in cfg.moe_layer_ids)


def _token_mask(run, ids):
    real = np.asarray(run.real)
    return real if ids is None else real & np.isin(run.tokens, ids)


def activation_counts(model, data=None, *, token_ids=None, exclude_ids=None, interventions=None,
                      batch_size: int = 8, max_len: int | None = None, progress: bool = False,
                      desc: str = "activation counts") -> ActivationCounts:
    """Count, per (MoE layer, expert), the real tokens of ``data`` (as :func:`grokviz.analysis.dataset.batches`
    reads it) whose top-k includes the expert. ``token_ids``: count only tokens with these ids;
    ``exclude_ids``: skip tokens with these ids; ``interventions`` apply to every run."""
    def mask(run):
        m = _token_mask(run, token_ids)
        return m if exclude_ids is None else m & ~np.isin(run.tokens, exclude_ids)

    return _count(model, data, [mask], interventions, batch_size, max_len, progress, desc)[0]


def _count(model, data, masks, interventions, batch_size, max_len, progress, desc) -> list:
    """One pass over ``data``: an :class:`ActivationCounts` per ``masks`` entry (fn(run) -> [batch, seq] bool)."""
    cfg = model.cfg
    rows = _moe_rows(cfg)
    active = [np.zeros((len(rows), cfg.num_experts), np.int64) for _ in masks]
    n = [0] * len(masks)
    iv = Interventions.none(cfg) if interventions is None else interventions   # the program steering_effect uses
    for toks in batches(model, data, batch_size=batch_size, max_len=max_len, progress=progress, desc=desc):
        run = model.run(toks, capture=[EXPERTS], interventions=iv)
        ex = np.asarray(run.cache[EXPERTS])
        for i, fn in enumerate(masks):
            m = fn(run)
            active[i] += R.expert_load(ex, m, cfg.num_experts)  # top-k ids are distinct: slots = tokens
            n[i] += int(m.sum())
    return [ActivationCounts(a, c, rows) for a, c in zip(active, n)]


def compare_counts(a: ActivationCounts, b: ActivationCounts, *, confidence: float = 0.95,
                   names=("a", "b")) -> pd.DataFrame:
    """Ranked (layer, expert) table of activation-rate differences ``rate_a - rate_b`` with Newcombe intervals:
    columns layer, expert, rate_a, rate_b, diff, ci_low, ci_high, significant (interval excludes 0), favours
    (``names[0]`` when diff > 0), n_a, n_b, rank (1 = largest |diff|)."""
    if a.active.shape != b.active.shape or a.layers != b.layers:
        raise ValueError(f"the two counts cover different layers/experts: {a.active.shape} {a.layers} vs "
                         f"{b.active.shape} {b.layers}")
    for name, c in zip(names, (a, b)):
        if c.n_tokens <= 0:
            raise ValueError(f"set {name!r} has no tokens to count (empty texts or a token filter that matched none)")
    z = _z_of(confidence)
    lo, hi = newcombe_interval(a.active, a.n_tokens, b.active, b.n_tokens, z)
    L, E = a.active.shape
    ra, rb = a.rates(), b.rates()
    df = pd.DataFrame({"layer": np.repeat(np.asarray(a.layers), E), "expert": np.tile(np.arange(E), L),
                       "rate_a": ra.ravel(), "rate_b": rb.ravel(), "diff": (ra - rb).ravel(),
                       "ci_low": lo.ravel(), "ci_high": hi.ravel()})
    df["significant"] = (df.ci_low > 0) | (df.ci_high < 0)
    df["favours"] = np.where(df["diff"] > 0, names[0], np.where(df["diff"] < 0, names[1], "-"))
    df["n_a"], df["n_b"] = a.n_tokens, b.n_tokens
    df = df.reindex(df["diff"].abs().sort_values(ascending=False, kind="stable").index).reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    return df


# ------------------------------------------------------------------------------------------------ detection
@dataclasses.dataclass
class Detection:
    """The result of :func:`detect`: the ranked ``table`` (see :func:`compare_counts`), both sets' counts, the
    set names, the confidence level and the model's config (for building interventions)."""

    table: pd.DataFrame
    counts_a: ActivationCounts
    counts_b: ActivationCounts
    names: tuple
    confidence: float
    cfg: object

    def diff_matrix(self) -> np.ndarray:
        """[moe layer, expert] rate_a - rate_b."""
        return self.counts_a.rates() - self.counts_b.rates()

    def top(self, n: int = 1, favours: str | None = None, significant: bool = True) -> pd.DataFrame:
        """The ``n`` top entries (largest |diff|), optionally only those favouring one set, only significant ones."""
        df = self.table
        if favours is not None:
            if favours not in self.names:
                raise ValueError(f"favours must be one of {self.names}, got {favours!r}")
            df = df[df.favours == favours]
        if significant:
            df = df[df.significant]
        return df.head(int(n))

    def bias(self, n: int = 2, strength: float = 4.0, toward: str | None = None, deactivate: bool = True):
        """[layer, expert] router bias (see :func:`steering_bias`)."""
        return steering_bias(self, n=n, strength=strength, toward=toward, deactivate=deactivate)

    def interventions(self, n: int = 2, strength: float = 4.0, toward: str | None = None,
                      deactivate: bool = True) -> Interventions:
        """``Interventions.none(cfg).with_router(bias=...)`` with :meth:`bias`."""
        return Interventions.none(self.cfg).with_router(bias=self.bias(n, strength, toward, deactivate))


def default_sets(split: str = "validation", a: str = "code", b: str = "prose", held_out: float = 0.5):
    """(detect_a, detect_b, held_a, held_b): the bundled corpus's ``split`` documents of domains ``a`` and ``b``
    (see grokviz/corpus: code, prose, numbers), each cut into a detection part and a held-out part (every
    other document goes to the held-out part when ``held_out`` = 0.5)."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out!r}")
    docs = default_dataset(split)
    out = []
    for dom in (a, b):
        texts = [d["text"] for d in docs if d["domain"] == dom]
        if len(texts) < 2:
            raise ValueError(f"domain {dom!r} has {len(texts)} document(s) in split {split!r}; need at least 2")
        keep = np.floor(np.arange(1, len(texts) + 1) * held_out) == np.floor(np.arange(len(texts)) * held_out)
        out.append(([t for t, k in zip(texts, keep) if k], [t for t, k in zip(texts, keep) if not k]))
    (da, ha), (db, hb) = out
    return da, db, ha, hb


def detect(model, set_a=None, set_b=None, *, names=("a", "b"), confidence: float = 0.95, batch_size: int = 8,
           max_len: int | None = None, progress: bool = True) -> Detection:
    """Activation-rate difference of every (MoE layer, expert) between two sets of texts (lists of str, dicts
    with "text", token arrays; default: the detection halves of :func:`default_sets`, code vs prose), ranked,
    with Newcombe intervals at ``confidence``."""
    if (set_a is None) != (set_b is None):
        raise ValueError("give both sets or neither (default: code vs prose from the bundled corpus)")
    if set_a is None:
        set_a, set_b, _, _ = default_sets()
        names = ("code", "prose") if tuple(names) == ("a", "b") else names
    names = tuple(names)
    if len(names) != 2 or names[0] == names[1]:
        raise ValueError(f"names must be two different labels, got {names!r}")
    kw = dict(batch_size=batch_size, max_len=max_len, progress=progress)
    ca = activation_counts(model, set_a, desc=f"set {names[0]}", **kw)
    cb = activation_counts(model, set_b, desc=f"set {names[1]}", **kw)
    return Detection(compare_counts(ca, cb, confidence=confidence, names=names), ca, cb, names, confidence,
                     model.cfg)


def detect_tokens(model, token_ids, data=None, *, names=("tokens", "others"), confidence: float = 0.95,
                  batch_size: int = 8, max_len: int | None = None, progress: bool = True) -> Detection:
    """As :func:`detect`, with the two sets being the tokens of ``data`` (default: the bundled validation split)
    whose ids are in ``token_ids`` and all its other tokens: which experts a kind of token (digits, say) uses."""
    ids = np.unique(np.asarray(token_ids, np.int64).ravel())
    if ids.size == 0 or ids.min() < 0 or ids.max() >= model.cfg.vocab_size:
        raise ValueError(f"token_ids must be non-empty ids in [0, {model.cfg.vocab_size})")
    items = default_dataset("validation") if data is None else data
    masks = [lambda r: _token_mask(r, ids), lambda r: _token_mask(r, None) & ~np.isin(r.tokens, ids)]
    ca, cb = _count(model, items, masks, None, batch_size, max_len, progress, "tokens")
    return Detection(compare_counts(ca, cb, confidence=confidence, names=tuple(names)), ca, cb, tuple(names),
                     confidence, model.cfg)


# ------------------------------------------------------------------------------------------------ steering
def steering_bias(det: Detection, n: int = 2, strength: float = 4.0, toward: str | None = None,
                  deactivate: bool = True) -> np.ndarray:
    """float32 [layer, expert] router bias from a :class:`Detection`: ``+strength`` on the ``n`` significant
    entries that most favour ``toward`` (default: the first set) and, with ``deactivate``, ``-strength`` on the
    ``n`` that most favour the other set (SteerMoE's activate / deactivate). Dense layers stay 0."""
    toward = det.names[0] if toward is None else toward
    if toward not in det.names:
        raise ValueError(f"toward must be one of {det.names}, got {toward!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not math.isfinite(strength) or strength <= 0:
        raise ValueError(f"strength must be finite and > 0, got {strength!r}")
    other = det.names[1] if toward == det.names[0] else det.names[0]
    bias = np.zeros((det.cfg.num_layers, det.cfg.num_experts), np.float32)
    up = det.top(n, favours=toward)
    if up.empty:
        raise ValueError(f"no expert significantly favours {toward!r}; nothing to steer toward")
    bias[up.layer.to_numpy(), up.expert.to_numpy()] = strength
    if deactivate:
        down = det.top(n, favours=other)
        bias[down.layer.to_numpy(), down.expert.to_numpy()] = -strength
    return bias


def _mean_logprob(model, data, iv, batch_size, max_len):
    """(sum of next-token log-probs over real pairs, pair count, counts of active experts, real tokens)."""
    cfg = model.cfg
    total, pairs = 0.0, 0
    rows = _moe_rows(cfg)
    active = np.zeros((len(rows), cfg.num_experts), np.int64)
    n = 0
    for toks in batches(model, data, batch_size=batch_size, max_len=max_len, progress=False):
        run = model.run(toks, capture=[EXPERTS], interventions=iv)
        logits = np.asarray(run.logits[:, :-1], np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        lp = np.take_along_axis(logp, toks[:, 1:, None].astype(np.int64), -1)[..., 0]
        ok = is_real(toks[:, 1:], cfg.pad_token) & is_real(toks[:, :-1], cfg.pad_token)
        total += float(lp[ok].sum())
        pairs += int(ok.sum())
        real = np.asarray(run.real)
        active += R.expert_load(np.asarray(run.cache[EXPERTS]), real, cfg.num_experts)
        n += int(real.sum())
    return total, pairs, active, n


def steering_effect(model, interventions: Interventions, held_a, held_b, *, names=("a", "b"),
                    batch_size: int = 8, max_len: int | None = None) -> pd.DataFrame:
    """What a router-bias steering does on held-out texts of each set, with and without it: per set, the mean
    activation rate of the boosted experts (bias > 0) and of the suppressed ones (bias < 0), and the mean
    next-token log-probability of the set's text (a classifier-free metric: steering toward set a should raise
    a's log-probability relative to b's). Columns: set, state ("unsteered"/"steered"), rate_boosted,
    rate_suppressed, mean_logprob, n_tokens."""
    cfg = model.cfg
    bias = np.asarray(interventions.router_bias)
    rows = list(_moe_rows(cfg))
    b = bias[rows]
    up, down = b > 0, b < 0
    none = Interventions.none(cfg)   # same pytree as the steered run: one compiled program for both
    out = []
    for name, data in zip(names, (held_a, held_b)):
        for state, iv in (("unsteered", none), ("steered", interventions)):
            total, pairs, active, n = _mean_logprob(model, data, iv, batch_size, max_len)
            rates = active / max(n, 1)
            out.append(dict(set=name, state=state, rate_boosted=float(rates[up].mean()) if up.any() else np.nan,
                            rate_suppressed=float(rates[down].mean()) if down.any() else np.nan,
                            mean_logprob=total / max(pairs, 1), n_tokens=n))
    return pd.DataFrame(out)


def effect_summary(effect: pd.DataFrame) -> pd.DataFrame:
    """Per set: steered minus unsteered rate of the boosted / suppressed experts and mean log-probability."""
    piv = effect.pivot(index="set", columns="state", values=["rate_boosted", "rate_suppressed", "mean_logprob"])
    out = pd.DataFrame({f"delta_{c}": piv[c]["steered"] - piv[c]["unsteered"]
                        for c in ("rate_boosted", "rate_suppressed", "mean_logprob")})
    return out.reindex(effect.set.unique())


def relative_logprob_shift(effect: pd.DataFrame) -> float:
    """The classifier-free effect size: (Δ mean log p of the first set) - (Δ of the second), in nats per token;
    > 0 when steering moved the model toward the first set's text relative to the second's."""
    d = effect_summary(effect)["delta_mean_logprob"]
    return float(d.iloc[0] - d.iloc[1])


def steered_generation(model, prompts, interventions: Interventions, max_new_tokens: int = 24, *, seed: int = 0,
                       temperature: float = 0.0, **kwargs) -> pd.DataFrame:
    """Continue each prompt with and without ``interventions`` (same seed and sampling; greedy by default).
    Columns: prompt, unsteered, steered (texts), rate_boosted_unsteered / rate_boosted_steered (share of the
    generated tokens' routing that went to the boosted experts, averaged over them)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    cfg = model.cfg
    rows = list(_moe_rows(cfg))
    up = np.asarray(interventions.router_bias)[rows] > 0           # [moe layer, expert]
    none = Interventions.none(cfg)
    res = {}
    for state, iv in (("unsteered", none), ("steered", interventions)):
        res[state] = model.generate(prompts, max_new_tokens, temperature=temperature, seed=seed,
                                    capture=[EXPERTS], interventions=iv, **kwargs)
    out = []
    for i, p in enumerate(prompts):
        row = {"prompt": p}
        for state, r in res.items():
            row[state] = r.texts[i] if r.texts is not None else r.new_tokens(i).tolist()
        for state, r in res.items():
            ex = r.step(EXPERTS)[:r.lengths[i], :, i]                  # [step, moe layer, k]
            hit = np.zeros(up.shape)
            for e in range(cfg.num_experts):
                hit[:, e] = (ex == e).any(-1).mean(0) if len(ex) else np.nan
            row[f"rate_boosted_{state}"] = float(hit[up].mean()) if up.any() else np.nan
        out.append(row)
    return pd.DataFrame(out)
