"""Drive each widget's controls programmatically and check that the figures show the new data."""

import re

import jax
import numpy as np
import pytest

import grokviz as gv
import grokviz.analysis
from grokviz import viz
from grokviz.analysis import routing as ra
from grokviz.viz import figures as F
from grokviz.api import forward_jit

SEQ = 24


@pytest.fixture(scope="module")
def model():
    cfg = gv.GrokConfig.tiny(num_layers=3, sequence_len=64)
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
    assert np.allclose(np.asarray(w.probs_fig.data[0].z), probs[:, 5])
    assert f"token 5 " in w.probs_fig.layout.title.text
    assert w.grid_fig.layout.shapes[0].x0 == 4.5
    # gates printed are the router probabilities of the chosen experts (Grok: no renormalisation)
    text = np.asarray(w.probs_fig.data[0].text)
    for l in range(3):
        for e, g in zip(experts[l, 5], gates[l, 5]):
            assert text[l, e] == f"{g:.2f}" and np.isclose(g, probs[l, 5, e])
        assert gates[l, 5].sum() < 1
    assert re.fullmatch(r"RoutingExplorer\(layer=2, token=5, row=0\)", repr(w))


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
    assert np.allclose(np.asarray(w.heatmap_fig.data[0].z), share)
    assert np.allclose(w.bars_fig.data[0].y, share[0])
    w.layer_slider.value = 1
    assert w.bars_fig.layout.title.text == "Layer 1 expert load share"
    assert np.allclose(w.bars_fig.data[0].y, share[1])
    np.testing.assert_allclose(np.asarray(w.coact_fig.data[0].z, np.float64), F.coactivation_conditional(co[1]))
    assert [s.y0 for s in w.bars_fig.layout.shapes] == [0.125]          # uniform share marked
    rates = ra.consecutive_rates(experts, run.real)
    assert np.allclose(w.rates_fig.data[0].y, rates["first_repeat"])
    assert repr(w) == "ExpertLoadDashboard(layer=1)"


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
    w.expert_boxes[1, e].value = True                                     # tick the checkbox
    assert w.state.removed == {(1, e)}
    new_first = w.current["first"][1, 0]
    assert not np.any(new_first == e)                                     # nobody routes to it any more
    assert not np.allclose(w.dist_fig.data[1].y, base_y)
    assert "Routing changed at" in w.route_fig.layout.title.text and " 0 of" not in w.route_fig.layout.title.text
    assert f"L1E{e}" in w.summary.value and w.current["loss"] != base_loss
    # zero mode: same routing, different output
    w.mode_select.value = "zero"
    assert np.array_equal(w.current["first"][1], w.base["first"][1])
    assert w.route_fig.layout.title.text.startswith(f"Routing changed at 0 of {3 * SEQ}") or \
        w.current["first"][2:].tolist() != w.base["first"][2:].tolist()
    w.head_boxes[0, 1].value = True
    assert w.state.heads == {(0, 1)} and "L0h1" in w.summary.value
    w.reset()
    assert w.state.removed == set() and not w.expert_boxes[1, e].value
    assert np.isclose(w.current["loss"], base_loss)
    assert forward_jit._cache_size() == compiled                          # values only: no recompile
    assert repr(w) == "AblationLab(removed=set(), heads=set(), mode='zero')"


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
