"""Routing fragility: the margin is the sorted-probability gap computed by hand; flips are 0 for identical settings
and match a hand count for a planted router bias (top-k of the captured logits plus the bias, recomputed in numpy);
the int8 quantisation follows the release's scheme; the figures and the view draw the frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import grokviz as gv
from grokviz.analysis import fragility as Fr
from grokviz.analysis.dataset import batches
from grokviz.interventions import Interventions
from grokviz.params import Int8Weight

DATA = Path(__file__).parent / "data" / "hf"
TEXTS = ["The cat sat on the mat and then it went home.", "Once upon a time, 42 dogs ran to the river bank",
         "def f(x):\n    return x + 1"]


def test_margin_is_the_sorted_gap_and_flips_compare_sets(rng):
    p = rng.dirichlet(np.ones(8), size=(3, 5, 7)).astype(np.float32)
    s = np.sort(p, -1)[..., ::-1]
    for k in (1, 2, 4):
        np.testing.assert_array_equal(Fr.topk_margin(p, k), s[..., k - 1] - s[..., k])
    assert np.isnan(Fr.topk_margin(p, 8)).all()
    with pytest.raises(ValueError, match="k must be in"):
        Fr.topk_margin(p, 9)
    a = np.array([[[1, 2], [3, 4], [5, 6]]])
    b = np.array([[[2, 1], [3, 5], [5, 6]]])                        # same set reordered, a flip, the same
    np.testing.assert_array_equal(Fr.selection_flips(a, b), [[False, True, False]])
    with pytest.raises(ValueError, match="same shape"):
        Fr.selection_flips(a, b[..., :1])


def test_int8_quantisation_follows_the_release_scheme(rng):
    w = rng.standard_normal((2, 16, 6)).astype(np.float32)
    q = Fr.quantize_int8(w, blocks=8)
    assert isinstance(q, Int8Weight) and q.weight.dtype == np.int8 and q.scales.shape == (2, 8, 6)
    back = np.asarray(q.dequantize())
    step = np.repeat(np.asarray(q.scales, np.float32), 2, axis=1)           # each row's block scale
    assert np.all(np.abs(back - w) <= 0.5 * step + 1e-6 * np.abs(w).max())
    assert np.abs(np.asarray(q.weight)).max() == 127


@pytest.fixture(scope="module")
def tiny():
    return gv.load("tiny", progress=False)


def test_identical_settings_never_flip_and_a_planted_bias_matches_a_hand_count(tiny):
    cfg = tiny.cfg
    layer, expert, bias = 2, 5, 0.6
    planted = Interventions.none(cfg).with_router(layer, bias=np.eye(cfg.num_experts, dtype=np.float32)[expert] * bias)
    fr = Fr.routing_fragility(tiny, TEXTS, variants=[("same", Interventions.none(cfg)), ("planted", planted)],
                              batch_size=4, progress=False)
    assert (fr.layers["flip_same"] == 0).all() and not fr.tokens["flip_same"].any()
    # by hand: top-k of the baseline log-probabilities (the logits up to a per-token constant) + the bias
    (toks,) = list(batches(tiny, TEXTS, batch_size=4, progress=False))
    run = tiny.run(toks, capture=["blocks.moe.router_probs", "blocks.moe.top_k_experts"])
    real = np.asarray(run.real)
    z = np.log(np.asarray(run.cache["blocks.moe.router_probs", layer], np.float64))
    z[..., expert] += bias
    hand = np.sort(np.argsort(-z, -1)[..., :cfg.top_k], -1)
    base = np.sort(np.asarray(run.cache["blocks.moe.top_k_experts", layer]), -1)
    flips, total = int((np.any(hand != base, -1) & real).sum()), int(real.sum())
    assert flips > 0
    row = fr.layers[fr.layers.layer == layer].iloc[0]
    assert row["n_tokens"] == total and round(row["flip_planted"] * total) == flips
    assert int(fr.tokens[fr.tokens.layer == layer]["flip_planted"].sum()) == flips
    assert (fr.layers.loc[fr.layers.layer < layer, "flip_planted"] == 0).all()    # the layers before: untouched
    assert fr.most_fragile_layer("planted") == layer
    # the margin column is the hand gap of the baseline run's probabilities
    s = np.sort(np.asarray(run.cache["blocks.moe.router_probs", 0]), -1)[..., ::-1]
    np.testing.assert_allclose(fr.tokens[fr.tokens.layer == 0]["margin"], (s[..., 1] - s[..., 2])[real], atol=1e-6)


def test_default_variants_and_the_figures(tiny):
    from grokviz.viz import fragility as V

    fr = Fr.routing_fragility(tiny, TEXTS, batch_size=4, progress=False)
    assert list(fr.layers.columns) == ["layer", "mean_margin", "median_margin", "fragile", "flip_bf16", "flip_int8",
                                       "flip_noise", "n_tokens"]
    rates = fr.layers[["flip_bf16", "flip_int8", "flip_noise", "fragile"]].to_numpy()
    assert ((rates >= 0) & (rates <= 1)).all() and fr.tokens["token"].notna().all()
    fig = V.fragility_summary(fr.layers, threshold=fr.threshold)
    assert [t.name for t in fig.data] == ["flips: bf16", "flips: int8", "flips: noise", "margin < 0.01"]
    heat = V.margin_heatmap(fr.tokens, 1, flip="noise")
    assert np.asarray(heat.data[0].z, float).shape == (4, int((fr.tokens.window == 1).sum() // 4))
    text = V.fragile_text_html(fr.tokens, 0, threshold=1.0)                         # every token below 1.0
    assert text.count("font-weight: bold") == int((fr.tokens.window == 0).sum() // 4)
    view = V.FragilityView(fr)
    view.window_slider.value = 2
    view.layer_select.value = 1
    assert "gv-fragile-text" in view.text.value and repr(view) == "FragilityView(window=2, layer=1, flip='')"
    with pytest.raises(ValueError, match="window 9"):
        V.margin_heatmap(fr.tokens, 9)
    with pytest.raises(ValueError, match="variants must be among"):
        Fr.routing_fragility(tiny, TEXTS, variants=["fp8"], progress=False)
    summary_only = Fr.routing_fragility(tiny, TEXTS, batch_size=4, per_token=False, progress=False)
    assert summary_only.tokens is None
    np.testing.assert_array_equal(summary_only.layers["flip_bf16"], fr.layers["flip_bf16"])   # seeded, same


def test_a_hugging_face_family():
    model = gv.load(DATA / "granitemoe", progress=False)
    toks = np.load(DATA / "granitemoe" / "golden.npz")["tokens"].astype(np.int32)
    fr = Fr.routing_fragility(model, toks, variants=["int8"], batch_size=4, progress=False)
    assert fr.layers["n_tokens"].iloc[0] == int((toks != model.cfg.pad_token).sum())
    assert list(fr.layers["layer"]) == list(model.cfg.moe_layer_ids) and fr.tokens["margin"].ge(0).all()
