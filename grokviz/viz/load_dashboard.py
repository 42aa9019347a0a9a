"""ExpertLoadDashboard: how the routed slots spread over the experts, pooled over a batch."""

from __future__ import annotations

import dataclasses

import ipywidgets as W
import numpy as np

from ..analysis import routing as ra
from . import figures as F
from .base import (
    COLUMN_WIDTH,
    View,
    check_moe_layer,
    figure_widget,
    flex_row,
    get_run,
    moe_layer_slider,
    routing_layers,
    shown,
    split,
    sync,
)
from .scale import ORDERS, expert_order

TOP_CHOICES = (16, 32, 64)
ORDER_LABELS = {"id": "by id", "load": "busiest first", "cluster": "clustered"}


@dataclasses.dataclass
class LoadState:
    layer: int = 0       # a MoE layer's number
    top: int = 0         # bars and co-activation: the layer's top-N busiest experts (0 = all)
    order: str = "id"    # "id" | "load" | "cluster" (co-activation clusters; the bars follow the same order)


class ExpertLoadDashboard(View):
    """Load share (layers x experts, dense layers grey), one layer's bars against uniform, co-activation,
    consecutive rates. ``prompt`` may be a list of texts or a token batch: statistics pool all real tokens of
    the batch. Controls: the MoE layer, how many experts the bars and the co-activation map show (``top``),
    and their order (``order``: by id, busiest first, or clustered by co-activation so that experts selected
    together sit side by side; the default for more than 32 experts)."""

    def __init__(self, source, prompt=None, *, layer: int | None = None, top: int = 0, order: str | None = None,
                 width: int = COLUMN_WIDTH):
        run = get_run(source, prompt, ("blocks.moe.top_k_experts",))
        self.cfg = cfg = run.cfg
        E = cfg.num_experts
        self.layers, self.num_layers = routing_layers(run)
        experts, real = np.asarray(run.cache["blocks.moe.top_k_experts"]), run.real
        self.n_tokens = int(real.sum())
        self.share = ra.load_share(experts, real, E)          # [moe layer, expert]
        self.coact = ra.coactivation(experts, real, E)        # [moe layer, expert, expert]
        self.rates = ra.consecutive_rates(experts, real)
        self.baselines = ra.consecutive_baselines(E, cfg.top_k)
        layer = check_moe_layer("layer", self.layers[0] if layer is None else layer, self.layers, self.num_layers)
        choices = [t for t in TOP_CHOICES if t < E]
        if top and top not in choices:
            raise ValueError(f"top={top!r} must be 0 (all experts) or one of {choices} (fewer than {E} experts)")
        order = ("cluster" if E > 32 else "id") if order is None else order
        if order not in ORDERS:
            raise ValueError(f"order={order!r} must be one of {ORDERS}")
        self._init_view()
        self.state = LoadState(layer=layer, top=top, order=order)
        self.layer_slider = moe_layer_slider("gv-load-layer-slider", self.layers, layer)
        self.top_select = W.Dropdown(options=[(f"all {E}", 0)] + [(f"top {t}", t) for t in choices], value=top,
                                     description="experts", layout=W.Layout(width="200px"))
        self.top_select.add_class("gv-load-top")
        self.order_select = W.Dropdown(options=[(ORDER_LABELS[o], o) for o in ORDERS], value=order,
                                       description="order", layout=W.Layout(width="220px"))
        self.order_select.add_class("gv-load-order")
        w_left, w_right = split(width, 52, 48)
        title = f"Expert load share per layer ({self.n_tokens} tokens)"
        self.heatmap_fig = figure_widget(F.load_share_heatmap(self.share, title, layers=self.layers,
                                                              num_layers=self.num_layers), w_left)
        rate_layers = np.asarray(self.layers)[np.asarray(self.rates["layer"], int)]
        self.rates_fig = figure_widget(F.consecutive_rates(rate_layers, self.rates["first_repeat"],
                                                           self.rates["topk_overlap"], self.baselines), w_right)
        self.bars_fig = figure_widget(self._bars(), w_left)
        self.coact_fig = figure_widget(self._coact(), w_right)
        self.figures = [self.heatmap_fig, self.bars_fig, self.coact_fig, self.rates_fig]
        for w in (self.layer_slider, self.top_select, self.order_select):
            w.observe(self._on_control, names="value")
        self.heatmap_fig.data[0].on_click(lambda trace, points, _: points.ys and self._clicked(int(points.ys[0])))
        self._finish([W.HBox([self.layer_slider, *shown(self.top_select, choices), self.order_select],
                             layout=W.Layout(flex_flow="row wrap")),
                      flex_row([self.heatmap_fig, self.rates_fig], width),
                      flex_row([self.bars_fig, self.coact_fig], width)], "gv-load-dashboard", width)

    def _on_control(self, change) -> None:
        self.state.layer = int(self.layer_slider.value)
        self.state.top = int(self.top_select.value)
        self.state.order = self.order_select.value
        self._changed("layer")

    def _clicked(self, layer: int) -> None:
        if layer in self.layers:                          # a click on a dense layer's row selects nothing
            self.set_layer(layer)

    def set_layer(self, layer: int) -> None:
        self.layer_slider.value = check_moe_layer("layer", layer, self.layers, self.num_layers)

    def shown_experts(self) -> np.ndarray:
        """The experts the bars and the co-activation map show at the selected layer, in their order."""
        return expert_order(self.coact[self.layers.index(self.state.layer)], self.state.order,
                            self.state.top or None)

    def _bars(self):
        l = self.state.layer
        return F.load_bars(self.share[self.layers.index(l)], l, experts=self.shown_experts())

    def _coact(self):
        l = self.state.layer
        return F.coactivation_heatmap(self.coact[self.layers.index(l)], l, self.cfg.top_k, order=self.state.order,
                                      top=self.state.top or None)

    def _draw(self, parts) -> None:
        sync(self.bars_fig, self._bars())
        sync(self.coact_fig, self._coact())
