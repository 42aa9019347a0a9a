"""Figure builders: inspect fig.data and titles (pure numpy in, plotly out; no JAX)."""

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from grokviz.viz import figures as F
from grokviz.viz import load_figures as LF
from grokviz.viz import scale as S
from grokviz.viz import theme

TOKENS = ["\u2581the", "\u2581cat", "\u2581the", "\u2581mat"]


def test_figure_builders_do_not_use_jax_or_widgets():
    # grokviz.viz lives in a package whose __init__ imports the JAX core; the builders themselves are pure
    src = "".join(Path(m.__file__).read_text() for m in (F, LF, S, theme))
    for mod in ("jax", "ipywidgets", "anywidget"):
        assert f"import {mod}" not in src and f"from {mod}" not in src


def test_expert_colours_are_stable_and_distinct():
    assert [theme.expert_color(e) for e in range(8)] == list(theme.EXPERT_PALETTE[:8])
    assert len(set(theme.EXPERT_PALETTE[:8])) == 8
    scale = theme.expert_colorscale(4)
    assert scale[0] == [0.0, theme.expert_color(0)] and scale[-1] == [1.0, theme.expert_color(3)]


def test_token_strip_keeps_repeated_tokens_distinct_and_shows_gates():
    experts = np.array([[1, 2], [3, 0], [1, 5], [7, 6]])
    gates = np.array([[0.5, 0.2], [0.4, 0.3], [0.6, 0.1], [0.3, 0.25]])
    fig = F.token_expert_strip(TOKENS, experts, gates, layer=3, num_experts=8)
    hm = fig.data[0]
    assert np.array_equal(np.asarray(hm.z), experts.T)
    assert np.allclose(np.asarray(hm.customdata), gates.T)          # gates as used, not renormalised
    assert list(hm.x) == [0, 1, 2, 3]                                # positions, not (merged) token strings
    assert list(fig.layout.xaxis.ticktext) == ["\u2423the", "\u2423cat", "\u2423the", "\u2423mat"]
    assert fig.layout.title.text.startswith("Layer 3")
    assert (hm.zmin, hm.zmax) == (-0.5, 7.5)


def test_token_chips_html_colours_by_first_choice_and_escapes():
    html = F.token_chips_html(["<b>", "x"], np.array([[2, 0], [5, 1]]), np.ones((2, 2)) * 0.4, selected=1)
    assert "&lt;b&gt;" in html and ">&lt;b&gt;<sub>2</sub>" in html
    assert html.count('class="gv-token"') == 2
    assert theme.expert_color(2) in html and theme.expert_color(5) in html
    assert "2px solid black" in html


def test_routing_grid_and_router_probs():
    first = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    fig = F.routing_grid(TOKENS, first, np.full((2, 4), 0.5), 4, selected=2)
    assert np.array_equal(np.asarray(fig.data[0].z), first)
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == 1.5
    probs = np.array([[0.1, 0.5, 0.3, 0.1], [0.4, 0.1, 0.1, 0.4]])
    experts, gates = np.array([[1, 2], [0, 3]]), np.array([[0.5, 0.3], [0.4, 0.4]])
    fig = F.router_probs_by_layer(probs, experts, gates, "\u2581cat", 1)
    text = np.asarray(fig.data[0].text)
    assert text[0, 1] == "0.50" and text[0, 2] == "0.30" and text[0, 0] == ""
    assert list(fig.data[1].x) == [1, 2, 0, 3] and list(fig.data[1].y) == [0, 0, 1, 1]
    assert "gates as applied" in fig.layout.title.text and "0.80" in fig.layout.title.text


def test_load_figures_mark_uniform_share():
    share = np.array([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    fig = F.load_share_heatmap(share)
    assert fig.data[0].zmid == 0.25 and "uniform = 0.250" in fig.layout.title.text
    bars = F.load_bars(share[1], 1)
    assert np.allclose(bars.data[0].y, share[1])
    assert [s.y0 for s in bars.layout.shapes] == [0.25]
    assert bars.layout.title.text == "Layer 1 expert load share"
    counts = np.array([[4, 2, 0], [2, 2, 1], [0, 1, 0]])  # diagonal = load; expert 2 is never selected
    co = F.coactivation_heatmap(counts, 2, k=2)
    z = np.asarray(co.data[0].z, np.float64)
    assert z[0, 1] == 0.5 and z[1, 0] == 1.0 and z[1, 2] == 0.5 and np.isnan(z[2]).all()
    assert np.isnan(np.diag(z)).all() and co.layout.title.text == "Layer 2 co-activation P(j | i) (random: 0.500)"
    rates = F.consecutive_rates(np.arange(2), [0.3, 0.4], [0.5, 0.6], {"first_repeat": 0.125, "topk_overlap": 0.2})
    assert len(rates.data) == 2 and sorted(s.y0 for s in rates.layout.shapes) == [0.125, 0.2]


def test_routing_sankey_links_follow_flows():
    flows = [np.array([[2, 0], [1, 3]]), np.array([[0, 4], [0, 2]])]
    fig = F.routing_sankey(flows, first_layer=5)
    s = fig.data[0]
    assert list(s.node.label) == ["L5 E0", "L5 E1", "L6 E0", "L6 E1", "L7 E0", "L7 E1"]
    links = sorted(zip(s.link.source, s.link.target, s.link.value))
    assert links == [(0, 2, 2.0), (1, 2, 1.0), (1, 3, 3.0), (2, 5, 4.0), (3, 5, 2.0)]
    assert "5\u20137" in fig.layout.title.text


def test_attention_figures():
    p = np.tril(np.ones((4, 4)))
    p /= p.sum(-1, keepdims=True)
    fig = F.attention_pattern(p, TOKENS, 1, 3, 1)
    assert np.allclose(fig.data[0].z, p) and fig.layout.title.text.startswith("Layer 1 head 3 (KV head 1)")
    assert fig.layout.yaxis.autorange == "reversed"
    x = np.array([-100.0, -10.0, 0.0, 50.0])
    cap = F.precap_vs_capped(x, 30 * np.tanh(x / 30), 30.0, 0, 0)
    assert np.allclose(cap.data[0].x, x)
    assert np.allclose(cap.data[1].y[[0, -1]], 30 * np.tanh(cap.data[1].x[[0, -1]] / 30))
    assert "50%" in cap.layout.title.text
    summ = F.head_summaries({"a": np.arange(4.0), "b": np.ones(4)}, 2, group_size=2)
    assert len(summ.data) == 4 and summ.data[3].name == "h3 (kv 1)"
    assert summ.data[2].marker.color == theme.expert_color(1)


def test_ablation_figures():
    base = np.array([0.5, 0.3, 0.2])
    new = np.array([0.1, 0.2, 0.7])
    fig = F.next_token_change(base, new, ["a", "b", "c"], top=2)
    assert list(fig.data[0].x) == ["a (0)", "b (1)", "c (2)"]
    assert np.allclose(fig.data[1].y, new)
    b0, b1 = np.array([[0, 1], [2, 3]]), np.array([[0, 2], [2, 3]])
    ch = F.routing_change(b0, b1, ["x", "y"], 4)
    z = np.asarray(ch.data[0].z, float)
    assert np.isnan(z[0, 0]) and z[0, 1] == 2 and "1 of 4" in ch.layout.title.text


@pytest.mark.parametrize("builder", ["load_bars", "coactivation_heatmap"])
def test_builders_return_plain_figures_with_template(builder):
    arg = np.ones(4) / 4 if builder == "load_bars" else np.ones((4, 4))
    fig = getattr(F, builder)(arg, 0)
    assert isinstance(fig, go.Figure) and fig.layout.template.layout.font.family.startswith("DejaVu")


def _has_non_finite(obj) -> bool:
    if isinstance(obj, dict):
        return any(_has_non_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_non_finite(v) for v in obj)
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return _has_non_finite(obj.tolist())
        return obj.dtype.kind == "f" and not np.isfinite(obj).all()
    return isinstance(obj, (float, np.floating)) and not np.isfinite(obj)


def test_figures_hold_no_nan_or_inf():
    """NaN cells (unused experts, unchanged routing, undefined rates) are None (a gap), never NaN in the data."""
    counts = np.array([[4, 2, 0], [2, 2, 1], [0, 1, 0]])
    figs = [F.coactivation_heatmap(counts, 0, k=2),
            F.routing_change(np.array([[0, 1], [2, 3]]), np.array([[0, 2], [2, 3]]), ["x", "y"], 4),
            F.consecutive_rates(np.arange(2), [np.nan, 0.4], [0.5, np.inf], {"first_repeat": 0.1}),
            F.head_summaries({"a": np.array([np.nan, 1.0])}, 0, group_size=1),
            F.precap_vs_capped(np.zeros(0), np.zeros(0), 30.0, 0, 0)]
    for fig in figs:
        assert not _has_non_finite(fig.to_plotly_json()["data"]), fig.layout.title.text


def test_figures_stay_legible_at_128_experts():
    E, L = 128, 64
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(E), size=L)
    experts = np.argsort(-probs, -1)[:, :8]
    fig = F.router_probs_by_layer(probs, experts, np.take_along_axis(probs, experts, -1), "x", 0)
    assert len(fig.layout.xaxis.tickvals) <= 32 and not any(np.asarray(fig.data[0].text).ravel())
    assert fig.data[1].marker.size <= 6                                    # outlines no wider than a cell
    assert len(fig.layout.yaxis.tickvals) <= 32 and fig.layout.height <= 900   # 64 layers: thinned, bounded
    co = F.coactivation_heatmap(rng.integers(0, 5, (E, E)) + np.eye(E, dtype=int) * 5, 0, k=2)
    assert co.data[0].text is None and len(co.layout.xaxis.tickvals) <= 32
    assert len(F.load_bars(np.ones(E) / E, 0).layout.xaxis.tickvals) <= 32
    grid = F.routing_grid(["t"] * 8, rng.integers(0, E, (L, 8)), np.ones((L, 8)), E)
    assert len(grid.data[0].colorbar.tickvals) <= 16 and grid.data[0].text is None   # no 3-digit ids in 9 px
    assert len(grid.layout.yaxis.tickvals) <= 32 and grid.layout.height <= 900
    strip = F.token_expert_strip(["t"] * 8, experts[0, None].repeat(8, 0), np.ones((8, 8)), 0, E)
    assert np.array_equal(np.asarray(strip.data[0].text), experts[0, None].repeat(8, 0).T.astype(str))
    share = F.load_share_heatmap(rng.dirichlet(np.ones(E), size=L))
    assert share.data[0].text is None and len(share.layout.yaxis.tickvals) <= 32


# ------------------------------------------------------------------ 64-128 experts, top-8, dense layers --

def test_expert_colours_beyond_the_palette_follow_one_continuous_scale():
    assert theme.expert_color(3, 8) == theme.expert_color(3) == theme.EXPERT_PALETTE[3]
    many = [theme.expert_color(e, 128) for e in range(128)]
    assert len(set(many)) > 100 and many[3] != many[13]                 # no cycling: 3 and 13 differ
    assert theme.expert_colorscale(128) == theme.MANY_EXPERTS
    chips = F.token_chips_html(["a"], np.array([[13, 3]]), np.ones((1, 2)), num_experts=128)
    assert many[13] in chips and "<sub>13</sub>" in chips


def test_expert_lists_parse_and_format():
    assert S.parse_ids("3,17, 90-95", 128) == [3, 17, 90, 91, 92, 93, 94, 95]
    assert S.parse_ids("", 8) == [] and S.parse_ids(" 2 2 1 ", 8) == [1, 2]
    assert S.format_ids([95, 3, 17, 90, 91, 92, 93, 94]) == "3, 17, 90-95"
    for bad, msg in (("128", r"'128' is outside \[0, 128\)"), ("5-2", "runs backwards"), ("x", "not a number"),
                     ("-3", "not a number")):
        with pytest.raises(ValueError, match=msg):
            S.parse_ids(bad, 128)


def _blocks(E=12, size=4, seed=0):
    """Co-activation counts of experts in blocks of ``size`` that fire together, ids shuffled."""
    perm = np.random.default_rng(seed).permutation(E)
    co = np.ones((E, E))
    for b in range(E // size):
        ids = perm[b * size:(b + 1) * size]
        co[np.ix_(ids, ids)] = 20
    np.fill_diagonal(co, 30)
    return co, perm


def test_cluster_order_puts_co_selected_experts_side_by_side():
    co, perm = _blocks()
    order = S.expert_order(co, "cluster")
    assert sorted(order) == list(range(12))
    block_of = {int(e): i // 4 for i, e in enumerate(perm)}
    runs = [block_of[int(e)] for e in order]
    assert sum(a != b for a, b in zip(runs, runs[1:])) == 2             # three contiguous blocks
    assert np.array_equal(S.expert_order(co, "cluster"), order)          # deterministic
    co[5, :] = co[:, 5] = 0                                              # an unused expert goes last
    assert S.expert_order(co, "cluster")[-1] == 5
    load = np.diag(co).copy()
    np.fill_diagonal(co, np.arange(12) + 1)
    assert list(S.expert_order(co, "load", top=3)) == [11, 10, 9]
    assert list(S.expert_order(co, "id", top=3)) == [9, 10, 11]
    assert load[5] == 0
    with pytest.raises(ValueError, match="order must be one of"):
        S.expert_order(co, "random")


def test_coactivation_map_follows_order_and_top():
    co, _ = _blocks(E=128, size=16, seed=1)
    co = co + np.diag(np.arange(128))                                    # distinct loads
    fig = F.coactivation_heatmap(co, 3, k=8, order="load", top=32)
    hm = fig.data[0]
    assert list(hm.x) == [f"E{e}" for e in range(127, 95, -1)] == list(hm.y)
    z = np.asarray(hm.z, np.float64)
    want = F.coactivation_conditional(co)[np.ix_(range(127, 95, -1), range(127, 95, -1))]
    np.testing.assert_allclose(z, np.round(want, 4))
    assert len(fig.layout.xaxis.tickvals) <= 32 and "32 of 128 experts, busiest first" in fig.layout.title.text
    full = F.coactivation_heatmap(co, 3, k=8, order="cluster")
    assert sorted(full.data[0].x) == sorted(f"E{e}" for e in range(128)) and "clustered" in full.layout.title.text


def test_load_bars_show_a_chosen_subset_with_ids():
    share = np.arange(128.0) / np.arange(128.0).sum()
    ids = np.array([127, 126, 5])
    fig = F.load_bars(share, 4, experts=ids)
    assert np.allclose(fig.data[0].y, share[ids]) and list(fig.data[0].customdata) == [127, 126, 5]
    assert list(fig.layout.xaxis.ticktext) == ["127", "126", "5"] and "(3 of 128 experts)" in fig.layout.title.text
    assert fig.data[0].marker.color[0] == theme.expert_color(127, 128)


def test_router_probs_top_n_keeps_the_highest_experts_and_their_outlines():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(128) * 0.1, size=4)
    experts = np.argsort(-probs, -1)[:, :8]
    gates = np.take_along_axis(probs, experts, -1)
    fig = F.router_probs_by_layer(probs, experts, gates, "x", 0, top=16)
    cols = np.sort(np.argsort(-probs.max(0), kind="stable")[:16])
    assert list(fig.layout.xaxis.ticktext) == [str(c) for c in cols]
    np.testing.assert_allclose(np.asarray(fig.data[0].z, float), np.round(probs[:, cols], 5))
    assert np.array_equal(np.asarray(fig.data[0].customdata)[0], cols)   # hover names the expert id
    x, y = np.asarray(fig.data[1].x), np.asarray(fig.data[1].y)
    for l in range(4):                                                   # every shown selection outlined
        assert sorted(cols[x[y == l]]) == sorted(e for e in experts[l] if e in cols)
    text = np.asarray(fig.data[0].text)
    e0 = int(experts[0, 0])
    assert text[0, list(cols).index(e0)] == f"{gates[0, 0]:.2f}"
    assert "top 16 of 128" in fig.layout.xaxis.title.text


def test_dense_layers_are_grey_labelled_rows():
    """Routing rows of MoE layers 1, 3 and 4 of a 6-layer model: each figure has 6 rows, the dense ones empty
    and shaded, and the ticks name the real layer numbers."""
    rows, L = [1, 3, 4], 6
    first = np.array([[0, 1], [2, 3], [4, 5]])
    grid = F.routing_grid(["a", "b"], first, np.full((3, 2), 0.5), 8, layers=rows, num_layers=L)
    z = grid.data[0].z
    assert len(z) == 6 and list(z[3]) == [2, 3] and list(z[0]) == [None, None] and list(z[5]) == [None, None]
    assert list(grid.layout.yaxis.ticktext) == ["0 dense", "1", "2 dense", "3", "4", "5 dense"]
    bands = [(s.y0, s.y1) for s in grid.layout.shapes if s.type == "rect" and s.fillcolor == S.DENSE_FILL]
    assert bands == [(-0.5, 0.5), (1.5, 2.5), (4.5, 5.5)] and "3 dense MLP layer(s)" in grid.layout.title.text
    probs = np.full((3, 8), 1 / 8)
    rp = F.router_probs_by_layer(probs, first, np.full((3, 2), 0.125), "a", 0, layers=rows, num_layers=L)
    assert [r[0] is None for r in rp.data[0].z] == [True, False, True, False, False, True]
    assert sorted(set(rp.data[1].y)) == [1, 3, 4]                        # outlines on the real layer rows
    share = F.load_share_heatmap(np.full((3, 8), 1 / 8), layers=rows, num_layers=L)
    assert len(share.data[0].z) == 6 and share.data[0].z[2][0] is None and share.data[0].z[4][0] == 0.125
    ch = F.routing_change(first, first[::-1], ["a", "b"], 8, layers=rows, num_layers=L)
    assert len(ch.data[0].z) == 6 and ch.data[0].z[1] == [4, 5] and ch.data[0].z[3] == [None, None]
    with pytest.raises(ValueError, match="layer 6 is outside the model's 6 layers"):
        F.routing_grid(["a", "b"], first, first, 8, layers=[1, 3, 6], num_layers=6)
    with pytest.raises(ValueError, match="2 layer numbers for 3 routing rows"):
        F.routing_grid(["a", "b"], first, first, 8, layers=[1, 3], num_layers=6)


def test_sankey_pools_all_but_the_top_experts_and_keeps_every_token():
    rng = np.random.default_rng(4)
    flows = [rng.integers(0, 3, (128, 128)) * (rng.random((128, 128)) < 0.05) for _ in range(2)]
    fig = F.routing_sankey(flows, layers=[1, 3, 5], top=8)
    s = fig.data[0]
    labels = list(s.node.label)
    assert len(labels) == 3 * 9 and labels[8] == "L1 other (120)" and labels[-1] == "L5 other (120)"
    assert np.isclose(sum(s.link.value), sum(f.sum() for f in flows))   # pooled, nothing dropped
    kept = sorted(int(l.split("E")[1]) for l in labels[:8])
    assert kept == sorted(np.argsort(-flows[0].sum(1), kind="stable")[:8].tolist())
    assert "layers 1\u20135 (MoE layers only), top 8 experts per layer" in fig.layout.title.text
