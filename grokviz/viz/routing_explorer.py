"""RoutingExplorer: which experts each token goes to, layer by layer."""

from __future__ import annotations

import dataclasses

import ipywidgets as W
import numpy as np

from . import figures as F
from .base import (
    COLUMN_WIDTH,
    ROUTING_CAPTURE,
    View,
    check_index,
    check_moe_layer,
    figure_widget,
    flex_row,
    get_run,
    moe_layer_slider,
    real_positions,
    routing_layers,
    shown,
    slider,
    split,
    sync,
)

TOP_CHOICES = (8, 16, 32, 64)      # "experts shown" in the router-probabilities figure of a large model


@dataclasses.dataclass
class RoutingState:
    layer: int = 0      # a MoE layer's number
    token: int = 0      # index among the row's real tokens
    row: int = 0
    top: int = 0        # experts shown in the router probabilities: the top-N by p at any layer (0 = all)


class RoutingExplorer(View):
    """Tokens coloured by selected expert at a layer (slider over the MoE layers), token x layer grid of first
    choices (dense layers as grey rows), and the selected token's router probabilities at every layer (gates as
    applied), for a large model restricted to the top-N experts (``top``, a control). Only the row's real
    tokens are shown (padding on either side is left out); ``token`` counts those."""

    def __init__(self, source, prompt=None, *, row: int = 0, layer: int | None = None, token: int | None = None,
                 top: int | None = None, width: int = COLUMN_WIDTH):
        run = get_run(source, prompt, ROUTING_CAPTURE)
        pos = real_positions(run, row)
        n = len(pos)
        self.cfg = run.cfg
        self.positions = pos
        self.tokens = [run.str_tokens(row)[p] for p in pos]
        self.layers, self.num_layers = routing_layers(run)                             # MoE layer numbers
        self.experts = np.asarray(run.cache["blocks.moe.top_k_experts"])[:, row, pos]    # [moe layer, seq, k]
        self.gates = np.asarray(run.cache["blocks.moe.top_k_weights"])[:, row, pos]      # [moe layer, seq, k]
        self.probs = np.asarray(run.cache["blocks.moe.router_probs"])[:, row, pos]       # [moe layer, seq, expert]
        E = self.cfg.num_experts
        layer = check_moe_layer("layer", self.layers[0] if layer is None else layer, self.layers, self.num_layers)
        token = check_index("token", n - 1 if token is None else token, n, f"row {row} has {n} real tokens")
        choices = [t for t in TOP_CHOICES if t < E]
        top = (32 if E > 32 else 0) if top is None else top
        if top and top not in choices:
            raise ValueError(f"top={top!r} must be 0 (all experts) or one of {choices} (fewer than {E} experts)")
        self._init_view()
        self.state = RoutingState(layer=layer, token=token, row=row, top=top)
        self.layer_slider = moe_layer_slider("gv-layer-slider", self.layers, layer)
        self.token_slider = slider("gv-token-slider", "token", 0, n - 1, token)
        self.top_select = W.Dropdown(options=[(f"all {E}", 0)] + [(f"top {t}", t) for t in choices], value=top,
                                     description="experts", layout=W.Layout(width="200px"))
        self.top_select.add_class("gv-top-experts")
        self.chips = W.HTML(self._chips())
        self.chips.add_class("gv-token-chips")
        w_grid, w_probs = split(width, 55, 45)
        self.strip_fig = figure_widget(self._strip(), width - 8)
        self.grid_fig = figure_widget(self._grid(), w_grid)
        self.probs_fig = figure_widget(self._probs(), w_probs)
        self.figures = [self.strip_fig, self.grid_fig, self.probs_fig]
        self.html_parts = [self.chips]
        self.layer_slider.observe(self._on_layer, names="value")
        self.token_slider.observe(self._on_token, names="value")
        self.top_select.observe(self._on_top, names="value")
        self.grid_fig.data[0].on_click(lambda trace, points, _: points.xs and self.set_token(int(points.xs[0])))
        self._finish([W.HBox([self.layer_slider, self.token_slider, *shown(self.top_select, choices)],
                             layout=W.Layout(flex_flow="row wrap")),
                      self.chips, self.strip_fig, flex_row([self.grid_fig, self.probs_fig], width)],
                     "gv-routing-explorer", width)

    def _row(self, layer: int) -> int:
        return self.layers.index(layer)

    # --- controls -> state (each change draws once) ---
    def _on_layer(self, change) -> None:
        self.state.layer = int(change["new"])
        self._changed("chips", "strip")

    def _on_token(self, change) -> None:
        self.state.token = int(change["new"])
        self._changed("chips", "grid", "probs")

    def _on_top(self, change) -> None:
        self.state.top = int(change["new"])
        self._changed("probs")

    def set_layer(self, layer: int) -> None:
        self.layer_slider.value = check_moe_layer("layer", layer, self.layers, self.num_layers)

    def set_token(self, token: int) -> None:
        n = len(self.tokens)
        self.token_slider.value = check_index("token", token, n, f"row {self.state.row} has {n} real tokens")

    # --- state -> figures ---
    def _chips(self) -> str:
        i = self._row(self.state.layer)
        return F.token_chips_html(self.tokens, self.experts[i], self.gates[i], self.state.token,
                                  self.cfg.num_experts)

    def _strip(self):
        l = self.state.layer
        i = self._row(l)
        return F.token_expert_strip(self.tokens, self.experts[i], self.gates[i], l, self.cfg.num_experts)

    def _grid(self):
        return F.routing_grid(self.tokens, self.experts[..., 0], self.gates[..., 0], self.cfg.num_experts,
                              selected=self.state.token, layers=self.layers, num_layers=self.num_layers)

    def _probs(self):
        t = self.state.token
        return F.router_probs_by_layer(self.probs[:, t], self.experts[:, t], self.gates[:, t], self.tokens[t], t,
                                       layers=self.layers, num_layers=self.num_layers, top=self.state.top or None)

    def _draw(self, parts) -> None:
        if "chips" in parts:
            self.chips.value = self._chips()
        if "strip" in parts:
            sync(self.strip_fig, self._strip())
        if "grid" in parts:
            sync(self.grid_fig, self._grid())
        if "probs" in parts:
            sync(self.probs_fig, self._probs())
