"""RoutingFlow: first-choice expert paths across consecutive layers, as a Sankey."""

from __future__ import annotations

import dataclasses

import ipywidgets as W
import numpy as np

from ..analysis import routing as ra
from . import figures as F
from .base import COLUMN_WIDTH, View, check_index, figure_widget, get_run, sync


@dataclasses.dataclass
class FlowState:
    first_layer: int = 0
    last_layer: int = 1


class RoutingFlow(View):
    """Sankey of first-choice expert paths across consecutive layers (range slider picks the layers)."""

    def __init__(self, source, prompt=None, *, layers: tuple[int, int] | None = None, width: int = COLUMN_WIDTH):
        run = get_run(source, prompt, ("blocks.moe.top_k_experts",))
        self.cfg = run.cfg
        self.experts, self.real = np.asarray(run.cache["blocks.moe.top_k_experts"]), run.real
        L = self.experts.shape[0]
        if L < 2:
            raise ValueError("a routing flow needs at least 2 layers")
        a, b = layers if layers is not None else (0, min(L - 1, 4))
        a = check_index("layers[0]", a, L, f"the model has {L} layers")
        b = check_index("layers[1]", b, L, f"the model has {L} layers")
        if b <= a:
            raise ValueError(f"layers=({a}, {b}) must be increasing: a flow runs from one layer to a later one")
        self._init_view()
        self.state = FlowState(a, b)
        self.range_slider = W.IntRangeSlider(value=(a, b), min=0, max=L - 1, description="layers",
                                             continuous_update=False, layout=W.Layout(width="420px"))
        self.range_slider.add_class("gv-flow-range")
        self.range_slider.observe(self._on_range, names="value")
        self.fig = figure_widget(self._sankey(), width - 8)
        self.figures = [self.fig]
        self._finish([self.range_slider, self.fig], "gv-routing-flow", width)

    def _on_range(self, change) -> None:
        first, last = (int(v) for v in change["new"])
        if last <= first:  # a flow needs two layers: widen the range (that change draws)
            self.range_slider.value = (first, first + 1) if first + 1 < self.experts.shape[0] else (first - 1, first)
            return
        self.state = FlowState(first, last)
        self._changed("flow")

    def set_layers(self, first: int, last: int) -> None:
        L = self.experts.shape[0]
        self.range_slider.value = (check_index("first", first, L, f"the model has {L} layers"),
                                   check_index("last", last, L, f"the model has {L} layers"))

    def _sankey(self):
        s = self.state
        flows = [ra.routing_flow(self.experts, self.real, l, self.cfg.num_experts)
                 for l in range(s.first_layer, s.last_layer)]
        return F.routing_sankey(flows, s.first_layer)

    def _draw(self, parts) -> None:
        sync(self.fig, self._sankey())
