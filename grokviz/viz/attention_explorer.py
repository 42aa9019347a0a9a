"""AttentionExplorer: one head's attention pattern, the soft-cap at work, and per-head summaries."""

from __future__ import annotations

import dataclasses

import ipywidgets as W
import numpy as np

from ..analysis import attention as aa
from . import figures as F
from .base import (
    ATTENTION_CAPTURE,
    COLUMN_WIDTH,
    View,
    check_index,
    figure_widget,
    flex_row,
    get_run,
    real_positions,
    slider,
    split,
    sync,
)


@dataclasses.dataclass
class AttentionState:
    layer: int = 0
    head: int = 0
    row: int = 0


class AttentionExplorer(View):
    """Layer slider and head selector (query heads grouped by KV head), the pattern with token labels,
    pre-cap vs capped scores, and per-head summaries of the layer. Only the row's real tokens are shown."""

    def __init__(self, source, prompt=None, *, row: int = 0, layer: int = 0, head: int = 0,
                 width: int = COLUMN_WIDTH):
        run = get_run(source, prompt, ATTENTION_CAPTURE)
        pos = real_positions(run, row)
        self.cfg = cfg = run.cfg
        self.tokens = [run.str_tokens(row)[p] for p in pos]
        sel = np.ix_(pos, pos)

        def take(name):  # [layer, head, seq, kv_seq] at the real positions of the row
            return np.asarray(run.cache[name])[:, row][:, :, sel[0], sel[1]]

        self.pattern, self.scores, self.logits = (take(n) for n in ATTENTION_CAPTURE)
        L, H = self.pattern.shape[:2]
        layer = check_index("layer", layer, L, f"the model has {L} layers")
        head = check_index("head", head, H, f"the model has {H} query heads")
        self._init_view()
        self.state = AttentionState(layer=layer, head=head, row=row)
        g = cfg.group_size
        self.layer_slider = slider("gv-attn-layer-slider", "layer", 0, L - 1, layer)
        options = [(f"KV {h // g} \u00b7 head {h}", h) for h in range(H)]
        self.head_select = W.Dropdown(options=options, value=head, description="head")
        self.head_select.add_class("gv-head-select")
        self._causal = np.tril(np.ones((len(pos), len(pos)), bool))
        full, real = np.asarray(run.cache["blocks.attn.pattern"])[:, row:row + 1], run.real[row:row + 1]
        self.summary = {"entropy (nats)": aa.head_entropy(full, real),           # each [layer, head]
                        "first-token mass": aa.first_token_attention(full, real),
                        "previous-token": aa.previous_token_score(full, real)}
        w_left, w_right = split(width, 54, 46)
        self.pattern_fig = figure_widget(self._pattern(), w_left)
        self.cap_fig = figure_widget(self._cap(), w_right)
        self.summary_fig = figure_widget(self._summaries(), w_right)
        self.figures = [self.pattern_fig, self.cap_fig, self.summary_fig]
        self.layer_slider.observe(self._on_control, names="value")
        self.head_select.observe(self._on_control, names="value")
        self._finish([W.HBox([self.layer_slider, self.head_select], layout=W.Layout(flex_flow="row wrap")),
                      flex_row([self.pattern_fig, W.VBox([self.cap_fig, self.summary_fig])], width)],
                     "gv-attention-explorer", width)

    def _on_control(self, change) -> None:
        self.state.layer, self.state.head = int(self.layer_slider.value), int(self.head_select.value)
        self._changed("layer" if change["owner"] is self.layer_slider else "head")

    def set(self, *, layer: int | None = None, head: int | None = None) -> None:
        """Select a layer and/or head (one redraw)."""
        L, H = self.pattern.shape[:2]
        layer = None if layer is None else check_index("layer", layer, L, f"the model has {L} layers")
        head = None if head is None else check_index("head", head, H, f"the model has {H} query heads")
        with self.hold():
            if layer is not None:
                self.layer_slider.value = layer
            if head is not None:
                self.head_select.value = head

    def _pattern(self):
        l, h = self.state.layer, self.state.head
        return F.attention_pattern(self.pattern[l, h], self.tokens, l, h, h // self.cfg.group_size)

    def _cap(self):
        l, h = self.state.layer, self.state.head
        return F.precap_vs_capped(self.logits[l, h][self._causal], self.scores[l, h][self._causal],
                                  self.cfg.attn_softcap, l, h)

    def _summaries(self):
        l = self.state.layer
        return F.head_summaries({k: v[l] for k, v in self.summary.items()}, l, self.cfg.group_size)

    def _draw(self, parts) -> None:
        sync(self.pattern_fig, self._pattern())
        sync(self.cap_fig, self._cap())
        if "layer" in parts:
            sync(self.summary_fig, self._summaries())
