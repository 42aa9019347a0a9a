"""The views at scale: 128 experts, top-8, a dense MLP layer among the MoE layers (layer 1 of 4). Each view is
driven through its controls and its figures' data is checked against the capture."""

import json

import jax
import numpy as np
import pytest

import grokviz as gv
from grokviz import viz
from grokviz.analysis import routing as ra
from grokviz.api import Run, forward_jit
from grokviz.cache import ActivationCache
from grokviz.viz import scale as S

E, K, L, MOE = 128, 8, 4, (0, 2, 3)
SEQ = 40


@pytest.fixture(scope="module")
def model():
    cfg = gv.GrokConfig.golden(num_experts=E, top_k=K, num_layers=L, moe_layers=MOE, dense_ffn=32, sequence_len=64)
    return gv.Model(cfg, gv.init_params(cfg, jax.random.key(5)))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(7).integers(1, 512, size=(2, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def run(model, tokens):
    return model.run(tokens, capture=["blocks.moe.*"])


def _widgets(w):
    """Every ipywidget in a view's tree (figures included)."""
    out, todo = [], [w]
    while todo:
        x = todo.pop()
        out.append(x)
        todo += list(getattr(x, "children", ()))
    return out


def test_routing_explorer_with_128_experts_and_a_dense_layer(run):
    w = viz.RoutingExplorer(run)
    experts = np.asarray(run.cache["blocks.moe.top_k_experts"])[:, 0]       # [3 MoE layers, seq, 8]
    probs = np.asarray(run.cache["blocks.moe.router_probs"])[:, 0]
    assert [v for _, v in w.layer_slider.options] == [0, 2, 3]              # the slider skips the dense layer
    w.layer_slider.value = 2
    assert w.strip_fig.layout.title.text.startswith("Layer 2:")
    assert np.array_equal(np.asarray(w.strip_fig.data[0].z), experts[1].T)     # MoE row 1 is layer 2
    assert np.array_equal(np.asarray(w.strip_fig.data[0].text), experts[1].T.astype(str))   # ids in the cells
    z = w.grid_fig.data[0].z
    assert len(z) == L and all(v is None for v in z[1]) and list(z[2]) == experts[1, :, 0].tolist()
    assert list(w.grid_fig.layout.yaxis.ticktext) == ["0", "1 dense", "2", "3"]
    assert w.state.top == 32 and len(w.probs_fig.layout.xaxis.tickvals) <= 32
    w.token_slider.value = 7
    cols = np.sort(np.argsort(-probs[:, 7].max(0), kind="stable")[:32])
    assert list(w.probs_fig.layout.xaxis.ticktext) == [str(c) for c in cols]
    pz = w.probs_fig.data[0].z
    assert pz[1][0] is None and np.allclose(pz[3], probs[2, 7, cols], atol=1e-5, rtol=0)
    w.top_select.value = 0                                                  # all 128 experts
    assert len(w.probs_fig.data[0].z[0]) == E and len(w.probs_fig.layout.xaxis.tickvals) == 32
    assert sorted(np.asarray(w.probs_fig.data[1].y).tolist()) == sorted([0] * K + [2] * K + [3] * K)
    with pytest.raises(ValueError, match=r"layer=1 is a dense MLP layer \(no routing\); the MoE layers are \[0, 2"):
        w.set_layer(1)
    with pytest.raises(ValueError, match="top=5 must be 0"):
        viz.RoutingExplorer(run, top=5)


def test_load_dashboard_with_128_experts_orders_and_top_n(run):
    w = viz.ExpertLoadDashboard(run)
    experts = np.asarray(run.cache["blocks.moe.top_k_experts"])
    share = ra.load_share(experts, run.real, E)
    co = ra.coactivation(experts, run.real, E)
    z = w.heatmap_fig.data[0].z
    assert len(z) == L and z[1][0] is None and np.allclose(z[3], share[2], atol=1e-5, rtol=0)
    assert [v for _, v in w.layer_slider.options] == [0, 2, 3] and w.state.order == "cluster"   # default at 128
    assert list(w.rates_fig.data[0].x) == [0, 2, 3]                         # real layer numbers
    w.layer_slider.value = 3
    order = S.expert_order(co[2], "cluster")
    assert list(w.coact_fig.data[0].x) == [f"E{e}" for e in order]
    assert list(w.bars_fig.data[0].customdata) == order.tolist()            # bars in the same order
    w.order_select.value = "load"
    w.top_select.value = 16
    busiest = np.argsort(-np.diag(co[2]), kind="stable")[:16]
    assert list(w.bars_fig.data[0].customdata) == busiest.tolist()
    assert np.allclose(w.bars_fig.data[0].y, share[2, busiest])
    assert list(w.coact_fig.data[0].y) == [f"E{e}" for e in busiest] and len(w.coact_fig.data[0].z) == 16
    title = w.coact_fig.layout.title.text
    assert title.startswith("Layer 3") and "16 of 128 experts, busiest first" in title
    with pytest.raises(ValueError, match="dense MLP layer"):
        w.set_layer(1)


def test_routing_flow_pools_experts_and_skips_the_dense_layer(run):
    w = viz.RoutingFlow(run)
    s = w.fig.data[0]
    assert w.state.top == 12 and (w.state.first_layer, w.state.last_layer) == (0, 3)
    assert sum(1 for lab in s.node.label if lab.startswith("L0 ")) == 13 and "L2 other (116)" in s.node.label
    assert not any(lab.startswith("L1 ") for lab in s.node.label)
    assert np.isclose(sum(s.link.value), 2 * 2 * SEQ)                      # every token in both flows
    assert "(MoE layers only)" in w.fig.layout.title.text
    w.range_slider.value = (2, 3)
    w.top_select.value = 0
    s = w.fig.data[0]
    assert len(s.node.label) == 2 * E and s.node.label[0] == "L2 E0"
    flow = ra.routing_flow(np.asarray(run.cache["blocks.moe.top_k_experts"]), run.real, 1, E)
    assert sorted(s.link.value) == sorted(flow[flow > 0].tolist())
    w.range_slider.value = (3, 3)                                           # widened to the previous MoE layer
    assert (w.state.first_layer, w.state.last_layer) == (2, 3)


def test_ablation_lab_is_a_handful_of_controls_at_any_size(model, tokens):
    lab = viz.AblationLab(model, tokens)
    n_widgets = len(_widgets(lab))
    assert n_widgets < 40 and not lab.expert_boxes and lab.head_boxes      # 128 experts: no checkbox; 4 heads: 4
    assert [label for label, _ in lab.layer_select.options] == ["0", "1 (dense: heads only)", "2", "3"]
    compiled = forward_jit._cache_size()
    lab.layer_select.value = 2
    lab.expert_picker.text.value = "3, 17, 90-95"                           # typed, Enter
    want = {(2, e) for e in [3, 17, 90, 91, 92, 93, 94, 95]}
    assert lab.state.removed == want and lab.runs == 1
    assert lab.expert_picker.text.value == "3, 17, 90-95" and "L2 E3, 17, 90-95" in lab.summary.value
    first = lab.current["first"][1]                                         # MoE row 1 = layer 2
    assert not np.isin(first, [3, 17, 90, 91, 92, 93, 94, 95]).any()
    assert np.array_equal(lab.current["first"][0], lab.base["first"][0])    # layer 0 untouched
    z = lab.route_fig.data[0].z
    assert len(z) == L and all(v is None for v in z[1])                      # the dense layer: its own grey row
    lab.expert_picker.text.value = "3, 200"                                 # refused, shown, nothing re-run
    assert "outside [0, 128)" in lab.expert_picker.error.value and lab.runs == 1 and lab.state.removed == want
    lab.layer_select.value = 1
    assert lab.expert_picker.text.disabled and lab.expert_picker.text.value == ""
    lab.head_picker.text.value = "0-1"
    assert lab.state.heads == {(1, 0), (1, 1)} and lab.runs == 2 and "L1 h0-1" in lab.summary.value
    with pytest.raises(ValueError, match="layer=1 is a dense MLP layer"):
        lab.toggle_expert(1, 0)
    lab.layer_select.value = 2
    assert lab.expert_picker.text.value == "3, 17, 90-95" and not lab.expert_picker.text.disabled
    lab.set_experts(3, range(E - K))                                        # as many as may go
    with pytest.raises(ValueError, match="removes all 128 experts at layer 3"):
        lab.set_experts(3, "0-127")
    assert lab.runs == 3
    lab.reset()
    assert lab.runs == 4 and np.isclose(lab.current["loss"], lab.base["loss"])
    assert forward_jit._cache_size() == compiled                            # values only: no recompile


def _synthetic_run(model, num_layers, moe, seq=24, seed=0):
    """A Run of a ``num_layers``-layer config routing at ``moe`` with random routing captures (the views read
    only the config, the tokens and the routing captures), so 64 layers need no 64-layer compile."""
    cfg = gv.GrokConfig.golden(num_experts=E, top_k=K, num_layers=num_layers, moe_layers=moe, dense_ffn=8,
                               sequence_len=64)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(moe), 1, seq, E))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[..., :K].astype(np.int32)
    names = ("blocks.moe.router_probs", "blocks.moe.top_k_experts", "blocks.moe.top_k_weights")
    values = dict(zip(names, (probs.astype(np.float32), top, np.take_along_axis(probs, top, -1).astype(np.float32))))
    cache = ActivationCache(values, {n: (tuple(moe), None) for n in names}, num_layers=num_layers)
    tokens = rng.integers(1, 512, (1, seq)).astype(np.int32)
    return Run(tokens, np.zeros((1, seq, 512), np.float32), cache, model, cfg=cfg, capture=frozenset(names))


def test_views_stay_legible_at_64_layers(model):
    """64 layers, every other one dense: every routing figure has 64 labelled rows, thinned ticks and a bounded
    height; the sliders step over the 32 MoE layers."""
    moe = tuple(range(1, 64, 2))
    run = _synthetic_run(model, 64, moe)
    views = [viz.RoutingExplorer(run), viz.ExpertLoadDashboard(run)]
    assert [v for _, v in views[0].layer_slider.options] == list(moe)
    for view in views:
        for fw in view.figures:
            if fw.layout.yaxis.title.text == "layer":
                assert len(fw.data[0].z) == 64 and fw.data[0].z[0][0] is None and fw.data[0].z[1][0] is not None
                assert len(fw.layout.yaxis.tickvals) <= 32 and fw.layout.yaxis.ticktext[0] == "0 dense"
            assert (fw.layout.height or 0) <= 900
    flow = viz.RoutingFlow(run)
    assert flow.fig.layout.title.text.startswith("First-choice routing flow, layers 1\u20139 (MoE layers only)")


def _wire(obj):
    """``obj`` as plotly's widget serializer sends it: JSON, with binary buffers that must be C-contiguous."""
    if isinstance(obj, dict) and "buffer" in obj:
        assert obj["buffer"].c_contiguous
        return obj["buffer"].nbytes
    if isinstance(obj, dict):
        return {k: _wire(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_wire(v) for v in obj]
    return obj


def test_widget_messages_at_scale_are_strict_json_and_bounded(model, tokens, run):
    """What the FigureWidgets of each view send (dense-layer gaps included) is strict JSON, and a 128-expert
    view stays well under a megabyte."""
    from plotly.serializers import _py_to_js

    lab = viz.AblationLab(model, tokens)
    lab.set_experts(2, "0-9")
    for view in (viz.RoutingExplorer(run), viz.ExpertLoadDashboard(run), viz.RoutingFlow(run), lab):
        size = 0
        for fw in view.figures:
            for part in (fw._widget_data, fw._widget_layout):
                size += len(json.dumps(_wire(_py_to_js(part, None)), allow_nan=False))
        assert size < 400_000, (type(view).__name__, size)
