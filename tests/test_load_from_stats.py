"""ExpertLoadDashboard.from_stats: the load dashboard of a dataset's RoutingStats (as routing_stats and
grokviz.study.load return them) draws what the dashboard of a Run over the same tokens draws, and its controls
redraw the figures."""

from __future__ import annotations

import numpy as np
import pytest

import grokviz as gv
from grokviz import viz
from grokviz.analysis import dataset as D
from grokviz.analysis import routing as ra
from grokviz.viz import figures as F


@pytest.fixture(scope="module")
def tiny():
    return gv.load("tiny", progress=False)


@pytest.fixture(scope="module")
def both(tiny):
    toks = np.random.default_rng(0).integers(4, tiny.cfg.vocab_size, size=(2, 24)).astype(np.int32)
    toks[1, 18:] = 0  # padding is not counted
    run = tiny.run(toks, capture=["blocks.moe.top_k_experts"])
    stats = D.routing_stats(tiny, toks, batch_size=2, token_stats=False, progress=False)
    return run, stats


def test_from_stats_draws_what_the_run_dashboard_draws(both):
    run, stats = both
    a, b = viz.ExpertLoadDashboard(run), viz.ExpertLoadDashboard.from_stats(stats)
    assert b.n_tokens == a.n_tokens == 42 and "42 tokens" in b.heatmap_fig.layout.title.text
    assert b.layers == a.layers == [0, 1, 2, 3]
    for fa, fb in zip(a.figures, b.figures):
        assert [t.type for t in fa.data] == [t.type for t in fb.data]
        for ta, tb in zip(fa.data, fb.data):
            for key in ("x", "y", "z"):
                va, vb = getattr(ta, key, None), getattr(tb, key, None)
                assert (va is None) == (vb is None)
                if va is not None:
                    assert np.array_equal(np.asarray(va), np.asarray(vb)), (fa.layout.title.text, key)


def test_from_stats_controls_redraw(both):
    run, stats = both
    w = viz.ExpertLoadDashboard.from_stats(stats, cfg=gv.load("tiny", progress=False).cfg, layer=1)
    share = stats.load / stats.load.sum(1, keepdims=True)
    assert np.allclose(w.bars_fig.data[0].y, share[1])
    w.layer_slider.value = 3
    assert w.bars_fig.layout.title.text == "Layer 3 expert load share"
    assert np.allclose(w.bars_fig.data[0].y, share[3])
    np.testing.assert_allclose(np.asarray(w.coact_fig.data[0].z, np.float64),
                               F.coactivation_conditional(stats.coactivation[3]), atol=5e-5, rtol=0)
    w.order_select.value = "load"  # busiest first: the bars follow the layer's loads, largest first
    shown = w.shown_experts()
    assert list(shown) == sorted(range(8), key=lambda e: (-stats.load[3, e], e))
    assert np.allclose(w.bars_fig.data[0].y, share[3][shown])
    experts = np.asarray(run.cache["blocks.moe.top_k_experts"])
    assert np.allclose(w.rates_fig.data[0].y, ra.consecutive_rates(experts, run.real)["first_repeat"])
    w._clicked(2)  # a click on the heatmap's row selects that layer
    assert w.layer_slider.value == 2 and repr(w) == "ExpertLoadDashboard(layer=2, top=0, order='load')"
    assert w.phase_select not in w.children[0].children  # no prefill/decode split in a dataset's stats


def test_from_stats_errors(both, tiny):
    run, stats = both
    with pytest.raises(ValueError, match="needs a RoutingStats"):
        viz.ExpertLoadDashboard.from_stats(run)
    with pytest.raises(ValueError, match="layer"):
        viz.ExpertLoadDashboard.from_stats(stats, layer=7)
    other = gv.load("tests/data/hf/olmoe", progress=False).cfg
    with pytest.raises(ValueError, match="cfg"):
        viz.ExpertLoadDashboard.from_stats(stats, cfg=other)
