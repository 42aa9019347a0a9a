"""RoutingFlow: first-choice expert paths across consecutive MoE layers, as a Sankey."""

from __future__ import annotations

import dataclasses

import ipywidgets as W
import numpy as np

from ..analysis import routing as ra
from . import figures as F
from .base import COLUMN_WIDTH, View, check_moe_layer, figure_widget, get_run, routing_layers, shown, sync

TOP_CHOICES = (4, 8, 12, 16, 32)


@dataclasses.dataclass
class FlowState:
    first_layer: int = 0     # MoE layer numbers
    last_layer: int = 1
    top: int = 0             # experts with a node of their own per layer (0 = all; the rest share "other")


class RoutingFlow(View):
    """Sankey of first-choice expert paths across consecutive MoE layers (a range slider over the MoE layers'
    numbers picks them; a flow skips dense layers). For a large model each layer keeps its ``top`` busiest
    experts as nodes and pools the rest into one "other" node (a control; default 12 above 16 experts)."""

    def __init__(self, source, prompt=None, *, layers: tuple[int, int] | None = None, top: int | None = None,
                 width: int = COLUMN_WIDTH):
        run = get_run(source, prompt, ("blocks.moe.top_k_experts",))
        self.cfg = run.cfg
        E = self.cfg.num_experts
        self.experts, self.real = np.asarray(run.cache["blocks.moe.top_k_experts"]), run.real
        self.layers, self.num_layers = routing_layers(run)
        if len(self.layers) < 2:
            raise ValueError(f"a routing flow needs at least 2 MoE layers; this model routes at {self.layers}")
        a, b = layers if layers is not None else (self.layers[0], self.layers[min(len(self.layers) - 1, 4)])
        a = check_moe_layer("layers[0]", a, self.layers, self.num_layers)
        b = check_moe_layer("layers[1]", b, self.layers, self.num_layers)
        if b <= a:
            raise ValueError(f"layers=({a}, {b}) must be increasing: a flow runs from one layer to a later one")
        choices = [t for t in TOP_CHOICES if t < E]
        top = (12 if E > 16 else 0) if top is None else top
        if top and top not in choices:
            raise ValueError(f"top={top!r} must be 0 (all experts) or one of {choices} (fewer than {E} experts)")
        self._init_view()
        self.state = FlowState(a, b, top)
        if self.layers == list(range(len(self.layers))):
            self.range_slider = W.IntRangeSlider(value=(a, b), min=0, max=len(self.layers) - 1,
                                                 description="layers", continuous_update=False,
                                                 layout=W.Layout(width="420px"))
        else:                                 # dense layers among them: step over the MoE layers' numbers
            self.range_slider = W.SelectionRangeSlider(options=[(str(l), l) for l in self.layers], value=(a, b),
                                                       description="layers", continuous_update=False,
                                                       layout=W.Layout(width="420px"))
        self.range_slider.add_class("gv-flow-range")
        self.top_select = W.Dropdown(options=[(f"all {E}", 0)] + [(f"top {t}", t) for t in choices], value=top,
                                     description="experts", layout=W.Layout(width="200px"))
        self.top_select.add_class("gv-flow-top")
        self.range_slider.observe(self._on_range, names="value")
        self.top_select.observe(self._on_top, names="value")
        self.fig = figure_widget(self._sankey(), width - 8)
        self.figures = [self.fig]
        self._finish([W.HBox([self.range_slider, *shown(self.top_select, choices)],
                             layout=W.Layout(flex_flow="row wrap")),
                      self.fig], "gv-routing-flow", width)

    def _on_range(self, change) -> None:
        i, j = (self.layers.index(int(v)) for v in self.range_slider.value)
        if j <= i:  # a flow needs two layers: widen the range (that change draws)
            i, j = (i, i + 1) if i + 1 < len(self.layers) else (i - 1, i)
            self.range_slider.value = (self.layers[i], self.layers[j])
            return
        self.state.first_layer, self.state.last_layer = self.layers[i], self.layers[j]
        self._changed("flow")

    def _on_top(self, change) -> None:
        self.state.top = int(change["new"])
        self._changed("flow")

    def set_layers(self, first: int, last: int) -> None:
        a = check_moe_layer("first", first, self.layers, self.num_layers)
        b = check_moe_layer("last", last, self.layers, self.num_layers)
        self.range_slider.value = (a, b)

    def _sankey(self):
        s = self.state
        i, j = self.layers.index(s.first_layer), self.layers.index(s.last_layer)
        flows = [ra.routing_flow(self.experts, self.real, r, self.cfg.num_experts) for r in range(i, j)]
        return F.routing_sankey(flows, layers=self.layers[i:j + 1], top=s.top or None)

    def _draw(self, parts) -> None:
        sync(self.fig, self._sankey())
