"""GenerationExplorer driven through its controls, on the bundled tiny model and on a random 128-expert top-8 model
with a dense MLP layer; the figures' data is checked against the GenerationResult the widget generated."""

import json

import jax
import numpy as np
import pytest
from plotly.callbacks import InputDeviceState, Points

import grokviz as gv
from grokviz import viz
from grokviz.generation import TRACE_COUNT
from grokviz.viz import generation_figures as G

PROMPT = "The router of a mixture"
N = 12


@pytest.fixture(scope="module")
def tiny():
    return gv.load("tiny")


@pytest.fixture(scope="module")
def built(tiny):
    """One explorer built (the program compiles once here); tests that change it build their own."""
    return viz.GenerationExplorer(tiny, PROMPT, N, min_interval=0)


def _first(result, layer_row):
    """(prefill first choices at the row's real prompt slots, generated tokens' first choices) at a routing row."""
    P, n_p, n_g = result.prompt_width, int(result.prompt_lengths[0]), int(result.lengths[0])
    pre = np.asarray(result.prefill["blocks.moe.top_k_experts"])[layer_row, 0, P - n_p:, 0]
    dec = result.steps["blocks.moe.top_k_experts"][:n_g, layer_row, 0, 0]
    return pre, dec


def _strip_cells(fig, cols):
    z = np.array([[np.nan if v is None else v for v in row] for row in fig.data[0].z], np.float64).reshape(-1)
    return z, cols


def test_build_streams_every_token_and_fills_strip_and_timeline(tiny, built):
    w = built
    r = w.traces["baseline"].result
    assert w.generations == 1 and r.lengths[0] == N
    assert w.stream_draws == [("baseline", i) for i in range(1, N + 1)]     # the timeline grew one step at a time
    ids = tiny.tokenizer.encode(PROMPT)
    assert w.traces["baseline"].ids.tolist() == ids + r.tokens[0].tolist()
    pre, dec = _first(r, 0)
    z, _ = _strip_cells(w.strip_fig, w.cols)
    assert np.array_equal(z[:len(ids) + N], np.concatenate([pre, dec]))  # prompt then continuation, layer 0
    assert np.isnan(z[len(ids) + N:]).all()
    assert list(w.strip_fig.data[1].text)[:len(ids)] == [G._short(tiny.tokenizer.id_to_piece(i)) for i in ids]
    timeline = np.asarray(w.timeline_fig.data[0].z, np.float64)          # [layer, step]
    for l in range(tiny.cfg.num_layers):
        assert np.array_equal(timeline[l], r.first_choice(l)[0])
    assert w.timeline_fig.layout.title.text == f"Routing while generating: step {N} of {N}"
    assert w.compare_fig.layout.title.text.startswith("Continuations: remove experts")
    assert w.state.token == len(ids) + N - 1 and w.token_slider.max == len(ids) + N - 1


def test_layer_token_head_top_controls(tiny):
    w = viz.GenerationExplorer(tiny, PROMPT, N)
    t = w.traces["baseline"]
    r = t.result
    w.layer_slider.value = 2
    pre, dec = _first(r, 2)
    z, _ = _strip_cells(w.strip_fig, w.cols)
    assert np.array_equal(z[:len(t)], np.concatenate([pre, dec]))
    assert w.strip_fig.layout.title.text.startswith("Layer 2")
    assert w.load_fig.layout.title.text.startswith("Layer 2 expert load")
    # a generated token: router probabilities at every layer and its attention row over the cache
    i = t.n_prompt + 4
    w.token_slider.value = i
    probs = r.steps["blocks.moe.router_probs"][4, :, 0]                   # [layer, expert]
    assert np.allclose(np.asarray(w.probs_fig.data[0].z, np.float64), probs, atol=5e-6, rtol=0)
    pattern = r.steps["blocks.attn.pattern"][4, :, 0]                     # [layer, head, slot]
    slots = list(range(r.prompt_width - t.n_prompt, r.prompt_width)) + [r.prompt_width + s for s in range(5)]
    att = np.asarray(w.attn_fig.data[0].z, np.float64)
    assert att.shape == (tiny.cfg.num_layers, i + 1)
    assert np.allclose(att, pattern[:, :, slots].mean(1), atol=5e-5)
    assert np.allclose(att.sum(1), 1, atol=1e-3)             # the real keys carry the whole row: no slot missed
    w.head_select.value = 3
    assert np.allclose(np.asarray(w.attn_fig.data[0].z, np.float64), pattern[:, 3][:, slots], atol=5e-5)
    assert "(head 3)" in w.attn_fig.layout.title.text
    # a prompt token: its prefill routing
    w.token_slider.value = 2
    pre_probs = np.asarray(r.prefill["blocks.moe.router_probs"])[:, 0, r.prompt_width - t.n_prompt + 2]
    assert np.allclose(np.asarray(w.probs_fig.data[0].z, np.float64), pre_probs, atol=5e-6, rtol=0)
    assert np.asarray(w.attn_fig.data[0].z).shape == (tiny.cfg.num_layers, 3)
    assert w.timeline_fig.layout.shapes[-1].y0 == 1.5                # the strip's layer marked on the timeline
    assert repr(w) == "GenerationExplorer(layer=2, token=2, top=0, head=3, removed=set(), show='baseline')"


def test_clicks_select_tokens(tiny, built):
    w = built
    t = w.traces["baseline"]
    state = InputDeviceState()
    w.strip_fig.data[0]._dispatch_on_click(Points([0], xs=[3], ys=[1], trace_index=0), state)
    assert w.state.token == w.cols + 3 and w.token_slider.value == w.cols + 3
    w.timeline_fig.data[0]._dispatch_on_click(Points([0], xs=[5], ys=[0], trace_index=0), state)
    assert w.state.token == t.n_prompt + 5
    assert w.timeline_fig.layout.shapes[-2].x0 == 4.5
    w.strip_fig.data[0]._dispatch_on_click(Points([0], xs=[w.cols - 1], ys=[5], trace_index=0), state)   # no token
    assert w.state.token == t.n_prompt + 5


def test_load_next_to_random_baseline(tiny, built):
    w = built
    t, k, E = w.traces["baseline"], tiny.cfg.top_k, tiny.cfg.num_experts
    w.set_layer(1)
    r = t.result
    P, n_p = r.prompt_width, t.n_prompt
    pre = np.asarray(r.prefill["blocks.moe.top_k_experts"])[1, 0, P - n_p:]
    dec = r.steps["blocks.moe.top_k_experts"][:, 1, 0]
    bars = w.load_fig.data
    assert np.allclose(bars[0].y, np.bincount(pre.ravel(), minlength=E) / n_p, atol=1e-5)
    assert np.allclose(bars[1].y, np.bincount(dec.ravel(), minlength=E) / N, atol=1e-5)
    assert np.isclose(sum(bars[0].y), k) and np.isclose(sum(bars[1].y), k)
    assert list(bars[2].y) == [k / E, k / E] and bars[2].name == f"random k/E = {k / E:.3f}"


def test_removal_regenerates_compares_and_never_recompiles(tiny):
    w = viz.GenerationExplorer(tiny, PROMPT, N, temperature=0.8, seed=4, stop=(), min_interval=0)
    base = w.traces["baseline"]
    traces = TRACE_COUNT[0]
    e = int(base.experts[0, base.n_prompt, 0])       # the first generated token's first choice at layer 0
    w.remove_field.value = f"{e}"                     # the control, at the slider's layer (0)
    assert w.generations == 2 and w.state.removed == {(0, e)} and not w.show_select.disabled
    new = w.traces["removed"]
    assert e not in new.experts[0] and e in base.experts[0]       # removed in the prompt and every step
    assert [s[0] for s in w.stream_draws[-N:]] == ["removed"] * N
    a, b = base.ids[base.n_prompt:].tolist(), new.ids[new.n_prompt:].tolist()
    d = next(i for i in range(N) if a[i] != b[i])
    assert G.first_divergence(a, b) == d
    z = np.asarray(w.compare_fig.data[0].z, np.float64)
    assert np.allclose(z[0], base.logprob, atol=1e-4) and np.allclose(z[1], new.logprob, atol=1e-4)
    assert w.compare_fig.layout.shapes[0].x0 == d - 0.5
    assert f"diverge at generated token {d}" in w.compare_fig.layout.title.text
    assert f"log p {base.logprob[d]:.3f}" in w.compare_html.value and f"log p {new.logprob[d]:.3f}" in \
        w.compare_html.value
    # the strip and inspector show the regenerated continuation on request
    w.show_select.value = "removed"
    zs, _ = _strip_cells(w.strip_fig, w.cols)
    assert np.array_equal(zs[:len(new)], new.experts[0, :, 0])
    # refused input is shown, nothing runs
    w.remove_field.value = "9"
    assert "outside [0, 8)" in w.error.value and w.generations == 2
    with pytest.raises(ValueError, match="at least top_k experts must remain"):
        w.set_removed(0, range(8))
    assert w.generations == 2
    # a second layer's removal; the field follows the slider's layer
    with w.hold():
        w.set_removed(2, "1-2")
        w.set_layer(2)
    assert w.generations == 3 and w.remove_field.value == "1-2" and w.state.show == "removed"
    assert "L0 E" in w.compare_fig.layout.title.text and "L2 E1-2" in w.compare_fig.layout.title.text
    w.set_seed(5)                                     # both continuations again, with the new seed
    assert w.generations == 5 and w.traces["baseline"].result.settings["seed"] == 5
    w.reset()
    assert w.state.removed == set() and w.state.show == "baseline" and w.show_select.disabled
    assert w.compare_fig.layout.title.text.startswith("Continuations: remove experts")
    assert TRACE_COUNT[0] == traces                  # removal and seed are values: no recompilation


def test_bad_arguments_are_clear_errors(tiny, built):
    with pytest.raises(ValueError, match="one prompt"):
        viz.GenerationExplorer(tiny, [PROMPT, PROMPT], 4)
    with pytest.raises(ValueError, match=r"layer=4 is outside \[0, 4\)"):
        viz.GenerationExplorer(tiny, PROMPT, 4, layer=4)
    with pytest.raises(ValueError, match="top=16"):
        viz.GenerationExplorer(tiny, PROMPT, 4, top=16)
    with pytest.raises(ValueError, match=r"token=99 is outside"):
        built.set_token(99)
    with pytest.raises(ValueError, match="nothing is removed yet"):
        built.set_show("removed")
    with pytest.raises(ValueError, match=r"expert=8 is outside \[0, 8\)"):
        built.set_removed(0, [8])


def _strict(x):
    return json.loads(json.dumps(x, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def test_figures_are_strict_json_and_the_widget_state(built):
    for fw in built.figures:
        json.dumps(_strict(fw.to_plotly_json()), allow_nan=False)
        assert len(fw._widget_data) == len(fw.data)
        assert fw._widget_layout["title"]["text"] == fw.layout.title.text
        assert fw.layout.width <= 1040


# --------------------------------------------------------------- 128 experts, top-8, a dense layer --

E, K, MOE = 128, 8, (0, 2, 3)


@pytest.fixture(scope="module")
def big():
    cfg = gv.GrokConfig.golden(num_experts=E, top_k=K, num_layers=4, moe_layers=MOE, dense_ffn=32, sequence_len=64)
    return gv.Model(cfg, gv.init_params(cfg, jax.random.key(5)))


def test_128_experts_top8_with_a_dense_layer(big):
    prompt = np.arange(1, 11, dtype=np.int32)
    w = viz.GenerationExplorer(big, prompt, N, stop=(), min_interval=0)
    t, r = w.traces["baseline"], w.traces["baseline"].result
    assert [v for _, v in w.layer_slider.options] == list(MOE) and t.layers == list(MOE)
    timeline = w.timeline_fig.data[0].z                                # [4 layers, steps]
    assert all(v is None for v in timeline[1])                         # the dense layer: a grey row, no routing
    assert w.timeline_fig.layout.yaxis.ticktext[1] == "1 dense"
    for row, l in enumerate(MOE):
        assert list(timeline[l]) == r.steps["blocks.moe.top_k_experts"][:, row, 0, 0].tolist()
    assert list(w.timeline_fig.data[0].text[3]) == [str(v) for v in timeline[3]]   # 12 steps: ids fit, printed
    wide = G.routing_timeline(np.zeros((3, 64), int), np.zeros((3, 64)), ["a"] * 64, E, steps=64, layers=MOE,
                              num_layers=4)
    assert wide.data[0].text is None and len(wide.layout.xaxis.tickvals) == 32   # 64 steps: colours, thinned ticks
    assert w.state.top == 32 and len(w.probs_fig.data[0].x) == 32     # router probabilities: top 32 of 128
    probs = r.steps["blocks.moe.router_probs"][N - 1, :, 0]
    shown = [int(c) for c in w.probs_fig.data[0].customdata[0]]
    assert set(np.argsort(-probs.max(0))[:32].tolist()) == set(shown)
    assert len(w.load_fig.data[0].x) == 32 and np.isclose(w.load_fig.data[2].y[0], K / E)
    w.set_top(0)
    assert len(w.load_fig.data[0].x) == E and np.isclose(sum(w.load_fig.data[1].y), K)
    with pytest.raises(ValueError, match="dense MLP layer"):
        w.set_layer(1)
    w.set_layer(3)
    top8 = t.experts[2, -1]
    w.set_removed(3, [int(top8[0])])
    new = w.traces["removed"]
    assert int(top8[0]) not in new.experts[2] and new.experts.shape == (3, len(new), K)
    assert w.compare_fig.layout.title.text.startswith(f"Continuations with L3 E{int(top8[0])} removed")
    for fw in w.figures:
        json.dumps(_strict(fw.to_plotly_json()), allow_nan=False)
