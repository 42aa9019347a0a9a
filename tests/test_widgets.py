"""Drive each widget's controls programmatically and check that the figures show the new data."""

import json
import re

import ipywidgets
import jax
import numpy as np
import plotly.graph_objects as go
import pytest

import grokviz as gv
import grokviz.analysis
from grokviz import viz
from grokviz.analysis import routing as ra
from grokviz.api import forward_jit
from grokviz.viz import figures as F

SEQ = 24


@pytest.fixture(scope="module")
def model():
    cfg = gv.GrokConfig.golden(num_layers=3, sequence_len=64)
    return gv.Model(cfg, gv.init_params(cfg, jax.random.key(1)))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(3).integers(1, 512, size=(1, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def run(model, tokens):
    return model.run(tokens, capture=["blocks.moe.*", "blocks.attn.pattern", "blocks.attn.scores",
                                      "blocks.attn.logits"])


def test_routing_explorer_layer_and_token_controls(model, tokens, run):
    w = viz.RoutingExplorer(run)
    experts = np.asarray(run.cache["blocks.moe.top_k_experts"])[:, 0]
    gates = np.asarray(run.cache["blocks.moe.top_k_weights"])[:, 0]
    probs = np.asarray(run.cache["blocks.moe.router_probs"])[:, 0]
    assert np.array_equal(np.asarray(w.strip_fig.data[0].z), experts[0].T)
    chips0 = w.chips.value
    w.layer_slider.value = 2                                   # the control, as a user would move it
    assert w.state.layer == 2 and w.strip_fig.layout.title.text.startswith("Layer 2")
    assert np.array_equal(np.asarray(w.strip_fig.data[0].z), experts[2].T)
    assert np.allclose(np.asarray(w.strip_fig.data[0].customdata), gates[2].T)
    assert w.chips.value != chips0
    w.token_slider.value = 5
    assert w.state.token == 5
    assert np.allclose(np.asarray(w.probs_fig.data[0].z), probs[:, 5], atol=5e-6, rtol=0)   # 5 decimals
    assert "token 5 " in w.probs_fig.layout.title.text
    assert w.grid_fig.layout.shapes[0].x0 == 4.5
    # gates printed are the router probabilities of the chosen experts (Grok: no renormalisation)
    text = np.asarray(w.probs_fig.data[0].text)
    for l in range(3):
        for e, g in zip(experts[l, 5], gates[l, 5]):
            assert text[l, e] == f"{g:.2f}" and np.isclose(g, probs[l, 5, e])
        assert gates[l, 5].sum() < 1
    assert re.fullmatch(r"RoutingExplorer\(layer=2, token=5, row=0, top=0\)", repr(w))


def test_routing_explorer_runs_a_model_with_padding(model, tokens):
    padded = np.concatenate([tokens[:, :10], np.zeros((1, 4), np.int32)], axis=1)
    w = viz.RoutingExplorer(model, padded)
    assert len(w.tokens) == 10 and np.asarray(w.strip_fig.data[0].z).shape == (2, 10)
    assert w.state.token == 9


def test_expert_load_dashboard_layer_slider(model, run):
    w = viz.ExpertLoadDashboard(run)
    experts = np.asarray(run.cache["blocks.moe.top_k_experts"])
    share = ra.load_share(experts, run.real, 8)
    co = ra.coactivation(experts, run.real, 8)
    assert np.allclose(np.asarray(w.heatmap_fig.data[0].z), share, atol=5e-6, rtol=0)   # 5 decimals
    assert np.allclose(w.bars_fig.data[0].y, share[0])
    w.layer_slider.value = 1
    assert w.bars_fig.layout.title.text == "Layer 1 expert load share"
    assert np.allclose(w.bars_fig.data[0].y, share[1])
    np.testing.assert_allclose(np.asarray(w.coact_fig.data[0].z, np.float64), F.coactivation_conditional(co[1]),
                               atol=5e-5, rtol=0)                         # 4 decimals
    assert [s.y0 for s in w.bars_fig.layout.shapes] == [0.125]          # uniform share marked
    rates = ra.consecutive_rates(experts, run.real)
    assert np.allclose(w.rates_fig.data[0].y, rates["first_repeat"])
    assert repr(w) == "ExpertLoadDashboard(layer=1, top=0, order='id')"


def test_expert_load_dashboard_pools_a_batch(model):
    toks = np.random.default_rng(0).integers(1, 512, size=(3, 16)).astype(np.int32)
    toks[1, 12:] = 0
    w = viz.ExpertLoadDashboard(model, toks)
    assert w.n_tokens == 44 and "44 tokens" in w.heatmap_fig.layout.title.text


def test_attention_explorer_layer_and_head(run):
    w = viz.AttentionExplorer(run)
    pat = np.asarray(run.cache["blocks.attn.pattern"])[:, 0]
    labels = [label for label, _ in w.head_select.options]
    assert labels == ["KV 0 \u00b7 head 0", "KV 0 \u00b7 head 1", "KV 1 \u00b7 head 2", "KV 1 \u00b7 head 3"]
    w.layer_slider.value = 1
    w.head_select.value = 3
    assert w.pattern_fig.layout.title.text == "Layer 1 head 3 (KV head 1) attention pattern"
    assert np.allclose(np.asarray(w.pattern_fig.data[0].z), pat[1, 3])
    logits = np.asarray(run.cache["blocks.attn.logits"])[1, 0, 3]
    causal = np.tril(np.ones((SEQ, SEQ), bool))
    assert np.allclose(w.cap_fig.data[0].x, logits[causal])
    assert np.allclose(w.cap_fig.data[0].y, 30 * np.tanh(logits[causal] / 30), atol=1e-4)
    ent = gv.analysis.attention.head_entropy(np.asarray(run.cache["blocks.attn.pattern"]), run.real)
    assert np.isclose(w.summary_fig.data[3].y[0], ent[1, 3])
    assert w.summary_fig.layout.title.text.startswith("Layer 1")


def test_ablation_lab_checkbox_reruns_without_recompiling(model, tokens):
    w = viz.AblationLab(model, tokens)
    base_loss, base_y = w.base["loss"], np.array(w.dist_fig.data[1].y)
    assert np.allclose(w.dist_fig.data[0].y, w.dist_fig.data[1].y)       # nothing ablated: identical
    compiled = forward_jit._cache_size()
    first0 = w.base["first"][1, 0]
    e = int(np.bincount(first0, minlength=8).argmax())                    # the busiest expert at layer 1
    w.layer_select.value = 1                                              # edit layer 1: no run
    assert w.runs == 0
    w.expert_boxes[e].value = True                                        # tick the checkbox
    assert w.expert_picker.text.value == str(e) and w.runs == 1           # the text field follows
    assert w.state.removed == {(1, e)}
    new_first = w.current["first"][1, 0]
    assert not np.any(new_first == e)                                     # nobody routes to it any more
    assert not np.allclose(w.dist_fig.data[1].y, base_y)
    assert "Routing changed at" in w.route_fig.layout.title.text and " 0 of" not in w.route_fig.layout.title.text
    assert f"L1 E{e}" in w.summary.value and w.current["loss"] != base_loss
    # zero mode: same routing, different output
    removed = dict(zip(w.dist_fig.data[1].x, w.dist_fig.data[1].y))
    w.mode_select.value = "contribution"
    assert np.array_equal(w.current["first"][:2], w.base["first"][:2])   # routing up to the layer is kept
    n_changed = int((w.current["first"][:, 0] != w.base["first"][:, 0]).sum())   # later layers may move
    assert w.route_fig.layout.title.text.startswith(f"Routing changed at {n_changed} of {3 * SEQ} ")
    zeroed = dict(zip(w.dist_fig.data[1].x, w.dist_fig.data[1].y))
    common = sorted(set(removed) & set(zeroed))
    assert common and not np.allclose([removed[k] for k in common], [zeroed[k] for k in common])
    w.layer_select.value = 0
    assert not any(b.value for b in w.expert_boxes.values())              # layer 0 has nothing removed
    w.head_boxes[1].value = True
    assert w.state.heads == {(0, 1)} and "L0 h1" in w.summary.value
    w.reset()
    w.layer_select.value = 1
    assert w.state.removed == set() and not w.expert_boxes[e].value and w.expert_picker.text.value == ""
    assert np.isclose(w.current["loss"], base_loss)
    assert forward_jit._cache_size() == compiled                          # values only: no recompile
    assert repr(w) == "AblationLab(removed=set(), heads=set(), mode='contribution', layer=1)"


def test_routing_flow_range(run):
    w = viz.RoutingFlow(run, layers=(0, 1))
    s = w.fig.data[0]
    assert list(s.node.label)[:2] == ["L0 E0", "L0 E1"] and len(s.node.label) == 16
    assert sum(s.link.value) == SEQ
    w.range_slider.value = (1, 2)
    assert w.fig.data[0].node.label[0] == "L1 E0"
    flow = ra.routing_flow(np.asarray(run.cache["blocks.moe.top_k_experts"]), run.real, 1, 8)
    assert sorted(w.fig.data[0].link.value) == sorted(flow[flow > 0].tolist())
    w.range_slider.value = (2, 2)                                         # collapses to a 2-layer flow
    assert (w.state.first_layer, w.state.last_layer) == (1, 2)


def test_export_html_is_standalone_and_atomic(run, tmp_path):
    w = viz.RoutingExplorer(run)
    out = viz.export_html(w, tmp_path / "routing.html")
    text = out.read_text()
    assert text.count("Plotly.newPlot") == 3 and 'class="gv-token-chips"' in text
    assert "<script src=" not in text and len(text) > 1_000_000               # plotly.js is inlined
    assert [p.name for p in tmp_path.iterdir()] == ["routing.html"]            # no temporary left behind
    fig_out = viz.export_html(w.grid_fig, tmp_path / "grid.html")
    assert fig_out.read_text().count("Plotly.newPlot") == 1
    with pytest.raises(TypeError, match="plotly figure or a grokviz view"):
        viz.export_html(object(), tmp_path / "x.html")


# ------------------------------------------------------------------ regressions of the "house in order" pass --

def test_view_of_a_run_keeps_its_interventions_and_top_k(model, tokens):
    """A Run without the captures a view needs is re-run with *its* settings, not the baseline."""
    iv = gv.Interventions.none(model.cfg).remove_expert(layer=1, expert=3)
    bare = model.run(tokens, interventions=iv, top_k=1)                    # no captures at all
    w = viz.RoutingExplorer(bare)
    assert w.experts.shape[-1] == 1                                       # top_k=1 kept
    assert not np.any(w.experts[1] == 3)                                  # expert 3 still removed at layer 1
    want = model.run(tokens, interventions=iv, top_k=1, capture=["blocks.moe.top_k_experts"])
    assert np.array_equal(w.experts, np.asarray(want.cache["blocks.moe.top_k_experts"])[:, 0])
    d = viz.ExpertLoadDashboard(bare)
    assert d.share[1, 3] == 0 and np.isclose(d.share[1].sum(), 1)


def _left_padded(tokens, pad=5):
    return np.concatenate([np.zeros((1, pad), np.int32), tokens[:, :12]], axis=1)


def test_views_show_the_real_tokens_of_a_left_padded_row(model, tokens):
    toks = _left_padded(tokens)
    run = model.run(toks, capture=["blocks.moe.*", "blocks.attn.pattern", "blocks.attn.scores", "blocks.attn.logits"])
    w = viz.RoutingExplorer(run)
    assert w.tokens == [str(t) for t in tokens[0, :12]] and w.state.token == 11
    experts = np.asarray(run.cache["blocks.moe.top_k_experts"])[:, 0, 5:]
    assert np.array_equal(np.asarray(w.strip_fig.data[0].z), experts[0].T)
    a = viz.AttentionExplorer(run)
    pat = np.asarray(run.cache["blocks.attn.pattern"])[0, 0, 0, 5:, 5:]
    assert np.allclose(np.asarray(a.pattern_fig.data[0].z, np.float64), pat) and pat.shape == (12, 12)
    lab = viz.AblationLab(model, toks)
    assert lab._first(lab.base).shape == (3, 12)
    assert "after token 16 " in lab.dist_fig.layout.title.text            # the last real token, not a pad


def _count(monkeypatch, module, name):
    calls = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


def test_each_control_change_draws_once(run, monkeypatch):
    w = viz.RoutingExplorer(run)
    strip, grid = _count(monkeypatch, F, "token_expert_strip"), _count(monkeypatch, F, "routing_grid")
    w.set_layer(1)                                                        # programmatic
    w.layer_slider.value = 2                                              # the control
    w.set_token(4)                                                        # e.g. a click on the grid
    assert (len(strip), len(grid)) == (2, 1)
    d = viz.ExpertLoadDashboard(run)
    bars = _count(monkeypatch, F, "load_bars")
    d.set_layer(2)
    d.set_layer(2)                                                        # no change: no redraw
    assert len(bars) == 1
    a = viz.AttentionExplorer(run)
    pattern = _count(monkeypatch, F, "attention_pattern")
    a.set(layer=1, head=2)
    a.head_select.value = 3
    assert len(pattern) == 2
    f = viz.RoutingFlow(run, layers=(0, 1))
    sankey = _count(monkeypatch, F, "routing_sankey")
    f.range_slider.value = (2, 2)                                         # widened to (1, 2): one drawing
    assert len(sankey) == 1 and f.range_slider.value == (1, 2)


def test_ablation_lab_runs_the_model_once_per_change(model, tokens, monkeypatch):
    w = viz.AblationLab(model, tokens)
    runs = []
    real_run = model.run
    monkeypatch.setattr(model, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    w.toggle_expert(0, 1)
    assert len(runs) == 1
    w.layer_select.value = 2
    w.expert_boxes[5].value = True
    w.layer_select.value = 1
    w.head_boxes[0].value = True
    assert len(runs) == 3 and w.state.removed == {(0, 1), (2, 5)} and w.state.heads == {(1, 0)}
    w.reset()                                                             # three controls back: one run
    assert len(runs) == 4 and w.state.removed == set() and w.state.heads == set()
    w.reset()                                                             # nothing to undo: no run
    assert len(runs) == 4
    with w.hold():
        w.toggle_expert(1, 1)
        w.toggle_expert(1, 2)
        w.set_mode("zero")
    assert len(runs) == 5 and w.state.removed == {(1, 1), (1, 2)}


def _strict_json(obj):
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _strict_json(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _views(model, run, tokens):
    r = viz.RoutingExplorer(run)
    r.set_layer(2), r.set_token(3)
    d = viz.ExpertLoadDashboard(run)
    d.set_layer(1)
    a = viz.AttentionExplorer(run)
    a.set(layer=2, head=1)
    f = viz.RoutingFlow(run, layers=(0, 2))
    f.set_layers(1, 2)
    lab = viz.AblationLab(model, tokens)
    lab.toggle_expert(1, 0), lab.set_mode("zero"), lab.toggle_head(0, 0)
    return [r, d, a, f, lab]


def test_figure_data_is_strict_json_and_is_the_widget_state(model, run, tokens):
    """No NaN/inf reaches a widget message; and each FigureWidget's state (what a front end that loads late draws
    from) holds the figure as it is now, not the empty figure it was built as."""
    for view in _views(model, run, tokens):
        for fw in view.figures:
            json.dumps(_strict_json(fw.to_plotly_json()), allow_nan=False)
            state = fw._widget_data
            assert len(state) == len(fw.data) >= 1, type(view).__name__
            for t_state, t in zip(state, fw.data):
                t = t.to_plotly_json()
                for key in ("x", "y", "z"):
                    if key in t:
                        assert json.dumps(_strict_json(t_state[key])) == json.dumps(_strict_json(t[key]))
            assert fw._widget_layout["title"]["text"] == fw.layout.title.text


def test_out_of_range_arguments_are_clear_value_errors(model, run, tokens):
    with pytest.raises(ValueError, match=r"layer=9 is outside \[0, 3\)"):
        viz.RoutingExplorer(run, layer=9)
    with pytest.raises(ValueError, match=r"token=24 is outside \[0, 24\)"):
        viz.RoutingExplorer(run, token=24)
    with pytest.raises(ValueError, match=r"head=9 is outside \[0, 4\).*query heads"):
        viz.AttentionExplorer(run, head=9)
    with pytest.raises(ValueError, match=r"row=1 is outside \[0, 1\)"):
        viz.AttentionExplorer(run, row=1)
    with pytest.raises(ValueError, match=r"layer=3 is outside \[0, 3\)"):
        viz.ExpertLoadDashboard(run).set_layer(3)
    with pytest.raises(ValueError, match=r"layers\[1\]=7 is outside"):
        viz.RoutingFlow(run, layers=(0, 7))
    lab = viz.AblationLab(model, tokens)
    with pytest.raises(ValueError, match=r"expert=8 is outside \[0, 8\)"):
        lab.toggle_expert(0, 8)


def test_side_by_side_figures_fit_the_column(run):
    for view in (viz.RoutingExplorer(run, width=900), viz.ExpertLoadDashboard(run, width=900),
                 viz.AttentionExplorer(run, width=900)):
        assert view.layout.max_width == "900px"
        for box in [c for c in view.children if isinstance(c, ipywidgets.HBox)]:
            figs = [c for c in box.children if isinstance(c, go.FigureWidget)]
            figs += [g for c in box.children if isinstance(c, ipywidgets.VBox) for g in c.children
                     if isinstance(g, go.FigureWidget)][:1]
            assert sum(f.layout.width for f in figs) <= 900 - 16 * (len(figs) - 1)
            assert box.layout.flex_flow == "row wrap"                     # narrower columns wrap, never clip
