"""The load dashboard on a GenerationResult: the prefill / decode / both toggle redraws every plot with that
phase's tokens, and the phase comparison plots show what a slow per-row recount of the captures gives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import grokviz as gv
from grokviz import viz
from grokviz.analysis import routing as ra

EX = "blocks.moe.top_k_experts"
PROMPTS = ["def add(a, b):\n    return", "The cat sat on the mat and"]
N_NEW = 8


@pytest.fixture(scope="module")
def tiny():
    return gv.load("tiny", progress=False)


@pytest.fixture(scope="module")
def result(tiny):
    return tiny.generate(PROMPTS, N_NEW, temperature=0.0, capture="routing", stop=())


def _slow_counts(result, phase, E=8):
    """[layer, expert] token counts, row by row from the raw captures (prompt at the right of its buffer)."""
    pre, steps = np.asarray(result.prefill[EX]), np.asarray(result.steps[EX])
    P = result.prompt_width
    counts, n = np.zeros((pre.shape[0], E), int), 0
    for r in range(result.batch):
        parts = []
        if phase in ("prefill", "both"):
            parts.append(pre[:, r, P - result.prompt_lengths[r]:])            # [layer, tokens, k]
        if phase in ("decode", "both"):
            parts.append(np.moveaxis(steps[:result.lengths[r], :, r], 0, 1))
        for part in parts:
            n += part.shape[1]
            for l in range(part.shape[0]):
                for e in part[l].ravel():
                    counts[l, e] += 1
    return counts, n


def test_phase_toggle_redraws_every_plot(result):
    w = viz.ExpertLoadDashboard(result)
    assert w.state.phase == "both" and w.phase_select in w.children[0].children
    for phase, what in (("prefill", "prompt tokens"), ("decode", "generated tokens"), ("both", "tokens")):
        w.phase_select.value = phase                                    # the control, as a user clicks it
        counts, n = _slow_counts(result, phase)
        assert w.state.phase == phase and w.n_tokens == n
        assert w.heatmap_fig.layout.title.text.startswith(f"Expert load share per layer ({n} {what})")
        share = counts / counts.sum(1, keepdims=True)
        assert np.allclose(np.asarray(w.heatmap_fig.data[0].z, np.float64), share, atol=5e-6)
        assert np.allclose(w.bars_fig.data[0].y, share[w.state.layer], atol=1e-12)
    assert sum(result.prompt_lengths) == _slow_counts(result, "prefill")[1]
    assert _slow_counts(result, "decode")[1] == 2 * N_NEW


def test_phase_comparison_plots_match_recount(result):
    w = viz.ExpertLoadDashboard(result, phase="decode", layer=2)
    pre, n_pre = _slow_counts(result, "prefill")
    dec, n_dec = _slow_counts(result, "decode")
    bars = w.phase_fig.data
    assert bars[0].name == f"prefill ({n_pre} tokens)" and bars[1].name == f"decode ({n_dec} tokens)"
    assert np.allclose(bars[0].y, pre[2] / n_pre, atol=1e-5) and np.allclose(bars[1].y, dec[2] / n_dec, atol=1e-5)
    assert bars[2].y[0] == 2 / 8                                           # random routing: k / E
    assert w.phase_fig.layout.title.text.startswith("Layer 2 expert load: prefill vs decode")
    w.layer_slider.value = 3
    assert w.phase_fig.layout.title.text.startswith("Layer 3") and np.allclose(w.phase_fig.data[1].y, dec[3] / n_dec,
                                                                              atol=1e-5)
    s = w.summary_fig.data
    cv_dec = dec.std(1) / dec.mean(1)
    assert np.allclose(s[2].y, cv_dec, atol=1e-4)                          # decode load CV per layer
    assert np.isclose(s[3].y[0], ra.load_baseline_cv(n_dec, 8, 2), atol=1e-5)
    tv = 0.5 * np.abs(pre / n_pre / 2 - dec / n_dec / 2).sum(1)
    assert np.allclose(s[4].y, tv, atol=1e-5)
    assert repr(w) == "ExpertLoadDashboard(layer=3, top=0, order='id', phase='decode')"


def test_run_source_has_no_phase_toggle_and_bad_input(tiny, result):
    run = tiny.run(tiny.encode(PROMPTS[0]), capture=[EX])
    w = viz.ExpertLoadDashboard(run)
    assert w.phase_select not in w.children[0].children and len(w.figures) == 4
    with pytest.raises(ValueError, match="no prefill/decode split"):
        viz.ExpertLoadDashboard(run, phase="decode")
    with pytest.raises(ValueError, match="must be one of"):
        viz.ExpertLoadDashboard(result, phase="prompt")
    with pytest.raises(ValueError, match="carries its own prompt"):
        viz.ExpertLoadDashboard(result, "text")
    with pytest.raises(ValueError, match="capture='routing'"):
        viz.ExpertLoadDashboard(dataclasses.replace(result, steps={}))     # generated without routing captured
