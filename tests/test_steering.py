"""Detect then steer (grokviz.analysis.steering): the intervals against Newcombe's published values, detection
recovers an expert planted to fire on digit tokens only (rank 1, right sign), a positive router bias on it
raises its activation rate, and a Hugging Face family runs the same path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import grokviz as gv
from grokviz.analysis import steering as St
from grokviz.analysis.dataset import default_dataset
from grokviz.interventions import Interventions
from grokviz.viz import steering_figures as SF

DATA = Path(__file__).parent / "data" / "hf"
PLANT_LAYER, PLANT_EXPERT = 0, 2      # the tiny model's layer-0 expert 2 takes 3 % of digit tokens naturally


def _digit_strings(rng, n, length=120):
    return ["".join(map(str, rng.integers(0, 10, length))) for _ in range(n)]


def _prose(n, skip=0):
    docs = [d["text"] for d in default_dataset("validation") if d["domain"] == "prose"][skip:skip + n]
    return [re.sub(r"\d", "", t)[:400] for t in docs]   # no digit tokens at all


def _plant(model, digits):
    """The tiny model with router column (PLANT_LAYER, PLANT_EXPERT) replaced by a large multiple of a direction
    that separates digit tokens' router inputs from the others' (class-balanced least squares on +-1 labels,
    no intercept, fitted on texts the tests never detect on): the expert then takes a slot on digit tokens and
    (almost) never elsewhere."""
    rng = np.random.default_rng(7)
    fit = model.encode(_digit_strings(rng, 4) + _prose(8, skip=40))[:, :model.cfg.sequence_len]
    run = model.run(fit, capture=["blocks.moe.pre_norm"])
    x = np.asarray(run.cache["blocks.moe.pre_norm", PLANT_LAYER])[run.real].astype(np.float64)
    y = np.isin(run.tokens[run.real], digits)
    w = np.where(y, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    sol = np.linalg.lstsq(x * np.sqrt(w)[:, None], np.where(y, 1.0, -1.0) * np.sqrt(w), rcond=None)[0]
    scale = 12.0 / float((x[y] @ sol).min())   # digit logits >= 12, natural ones < 6
    params = dict(model.params)
    params["blocks"] = dict(params["blocks"])
    router = params["blocks"]["router"]
    params["blocks"]["router"] = router.at[PLANT_LAYER, :, PLANT_EXPERT].set((scale * sol).astype(router.dtype))
    return gv.Model(model.cfg, params, model.tokenizer)


@pytest.fixture(scope="module")
def tiny():
    return gv.load("tiny", progress=False)


@pytest.fixture(scope="module")
def digits(tiny):
    pieces = [tiny.tokenizer.id_to_piece(i) for i in range(tiny.cfg.vocab_size)]
    return np.array([i for i, p in enumerate(pieces) if p.isdigit()])


@pytest.fixture(scope="module")
def planted(tiny, digits):
    return _plant(tiny, digits)


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    return dict(a=_digit_strings(rng, 12), b=_prose(12), held_a=_digit_strings(rng, 4), held_b=_prose(4, skip=20))


@pytest.fixture(scope="module")
def detection(planted, sets):
    return St.detect(planted, sets["a"], sets["b"], names=("digits", "prose"), progress=False)


def test_intervals_equal_published_values():
    # Newcombe (1998), Table II, method 10; Wilson interval of 81/263 from Newcombe's companion paper
    assert np.allclose(St.newcombe_interval(56, 70, 48, 80), (0.0524, 0.3339), atol=5e-5)
    assert np.allclose(St.newcombe_interval(9, 10, 3, 10), (0.1705, 0.8090), atol=5e-5)
    assert np.allclose(St.wilson_interval(81, 263), (0.2553, 0.3662), atol=5e-5)
    lo, hi = St.wilson_interval(0, 0)
    assert (lo, hi) == (0.0, 1.0)


def test_planted_expert_fires_on_digits_only(planted, digits, sets):
    on = St.activation_counts(planted, sets["a"], token_ids=digits)
    off = St.activation_counts(planted, sets["b"])
    assert on.n_tokens > 1000 and off.n_tokens > 1000
    assert on.rates()[PLANT_LAYER, PLANT_EXPERT] == 1.0
    assert off.rates()[PLANT_LAYER, PLANT_EXPERT] < 0.03


def test_detection_recovers_planted_expert_rank_1_right_sign(planted, detection, sets):
    t = detection.table
    first = t.iloc[0]
    assert (first.layer, first.expert, first["rank"]) == (PLANT_LAYER, PLANT_EXPERT, 1)
    assert first["diff"] > 0 and first.favours == "digits" and first.significant and first.ci_low > 0
    assert first["diff"] - abs(t.iloc[1]["diff"]) > 0.05          # a margin, not a tie
    # the counts behind the table, recounted token by token from plain runs
    toks = planted.encode(sets["a"])
    toks = np.pad(toks, ((0, 16 - len(toks)), (0, 128 - toks.shape[1])))       # pad id 0: two batches of 8
    hits = n = 0
    for part in (toks[:8], toks[8:]):
        run = planted.run(part, capture=["blocks.moe.top_k_experts"], interventions=Interventions.none(planted.cfg))
        ex = np.asarray(run.cache["blocks.moe.top_k_experts", PLANT_LAYER])
        hits += sum(int(PLANT_EXPERT in ex[b, t]) for b, t in zip(*np.nonzero(run.real)))
        n += int(run.real.sum())
    ca = detection.counts_a
    assert (ca.active[PLANT_LAYER, PLANT_EXPERT], ca.n_tokens) == (hits, n)
    assert np.isclose(first.rate_a, hits / n)
    assert np.isclose(first["diff"], first.rate_a - first.rate_b)
    assert first.ci_low <= first["diff"] <= first.ci_high
    assert len(t) == 4 * 8 and list(t["rank"]) == list(range(1, 33))
    assert np.all(np.diff(t["diff"].abs().to_numpy()) <= 1e-12)
    assert np.allclose(detection.diff_matrix()[t.layer, t.expert], t["diff"])


def test_positive_bias_raises_planted_expert_rate(planted, detection, sets):
    bias = detection.bias(n=1, strength=30.0, deactivate=False)
    assert bias[PLANT_LAYER, PLANT_EXPERT] == 30.0 and np.count_nonzero(bias) == 1
    iv = detection.interventions(n=1, strength=30.0)
    eff = St.steering_effect(planted, iv, sets["held_a"], sets["held_b"], names=("digits", "prose"))
    prose = eff[eff.set == "prose"].set_index("state")
    assert prose.loc["steered", "rate_boosted"] > prose.loc["unsteered", "rate_boosted"] + 0.3
    assert prose.loc["unsteered", "rate_boosted"] < 0.03
    summary = St.effect_summary(eff)
    assert list(summary.index) == ["digits", "prose"]
    assert np.isfinite(St.relative_logprob_shift(eff))
    fig = SF.steering_effect(eff)
    assert [tr.type for tr in fig.data] == ["bar"] * 4
    gen = St.steered_generation(planted, ["The", "Total:"], iv, 8)
    assert list(gen.columns[:3]) == ["prompt", "unsteered", "steered"]
    assert (gen.rate_boosted_steered >= gen.rate_boosted_unsteered).all()
    assert (gen.rate_boosted_steered == 1.0).all()


def test_figures_show_the_table(detection):
    fig = SF.detection_heatmap(detection.diff_matrix(), detection.names, layers=detection.counts_a.layers,
                               num_layers=4, top=detection.top(3, significant=False))
    z = np.asarray(fig.data[0].z, np.float64)
    assert z.shape == (4, 8) and np.allclose(z, np.round(detection.diff_matrix(), 4))
    assert list(fig.data[1].text) == ["#1", "#2", "#3"]
    bars = SF.ranked_bars(detection.table, top=5, names=detection.names)
    assert bars.data[0].y[-1] == f"L{PLANT_LAYER} E{PLANT_EXPERT}"    # rank 1 drawn at the top
    big = SF.detection_heatmap(np.random.default_rng(0).normal(size=(64, 128)) * 0.1)
    assert big.data[0].text is None and big.layout.height <= 800


def test_bad_input_gives_clear_errors(tiny, detection):
    with pytest.raises(ValueError, match="both sets or neither"):
        St.detect(tiny, ["x"])
    with pytest.raises(ValueError, match="toward must be one of"):
        detection.bias(toward="code")
    with pytest.raises(ValueError, match="n must be a positive int"):
        detection.bias(n=0)
    with pytest.raises(ValueError, match="strength must be finite"):
        detection.bias(strength=float("nan"))
    with pytest.raises(ValueError, match="token_ids must be non-empty ids"):
        St.detect_tokens(tiny, [tiny.cfg.vocab_size], ["x"])
    other = St.ActivationCounts(np.zeros((2, 8), np.int64), 5, (0, 1))
    with pytest.raises(ValueError, match="different layers"):
        St.compare_counts(detection.counts_a, other)
    with pytest.raises(ValueError, match="no tokens"):
        St.compare_counts(St.ActivationCounts(np.zeros((4, 8), np.int64), 0, (0, 1, 2, 3)), detection.counts_b)
    with pytest.raises(ValueError, match="confidence"):
        St.compare_counts(detection.counts_a, detection.counts_b, confidence=1.5)
    with pytest.raises(ValueError, match="lacks columns"):
        SF.ranked_bars(detection.table[["layer"]])


def test_hf_family_detect_and_steer():
    model = gv.load(DATA / "qwen2_moe", progress=False)
    tokens = np.load(DATA / "qwen2_moe" / "golden.npz")["tokens"].astype(np.int32)
    det = St.detect(model, tokens[:2], tokens[2:], progress=False)
    cfg = model.cfg
    assert len(det.table) == len(cfg.moe_layer_ids) * cfg.num_experts
    assert set(det.table.layer) == set(cfg.moe_layer_ids)
    iv = det.interventions(n=1, strength=8.0, deactivate=False)
    eff = St.steering_effect(model, iv, tokens[:2], tokens[2:])
    steered = eff[eff.state == "steered"].rate_boosted.to_numpy()
    unsteered = eff[eff.state == "unsteered"].rate_boosted.to_numpy()
    assert np.all(steered >= unsteered) and np.all(steered > 0.9)
