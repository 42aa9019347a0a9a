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
    figure_widget,
    flex_row,
    get_run,
    real_positions,
    slider,
    split,
    sync,
)


@dataclasses.dataclass
class RoutingState:
    layer: int = 0
    token: int = 0      # index among the row's real tokens
    row: int = 0


class RoutingExplorer(View):
    """Tokens coloured by selected expert at a layer (slider), token x layer grid of first choices, and the
    selected token's router probabilities at every layer (gates as used: un-renormalised). Only the row's real
    tokens are shown (padding on either side is left out); ``token`` counts those."""

    def __init__(self, source, prompt=None, *, row: int = 0, layer: int = 0, token: int | None = None,
                 width: int = COLUMN_WIDTH):
        run = get_run(source, prompt, ROUTING_CAPTURE)
        pos = real_positions(run, row)
        n = len(pos)
        self.cfg = run.cfg
        self.positions = pos
        self.tokens = [run.str_tokens(row)[p] for p in pos]
        self.experts = np.asarray(run.cache["blocks.moe.top_k_experts"])[:, row, pos]    # [layer, seq, k]
        self.gates = np.asarray(run.cache["blocks.moe.top_k_weights"])[:, row, pos]      # [layer, seq, k]
        self.probs = np.asarray(run.cache["blocks.moe.router_probs"])[:, row, pos]       # [layer, seq, expert]
        L = self.experts.shape[0]
        layer = check_index("layer", layer, L, f"the model has {L} layers")
        token = check_index("token", n - 1 if token is None else token, n, f"row {row} has {n} real tokens")
        self._init_view()
        self.state = RoutingState(layer=layer, token=token, row=row)
        self.layer_slider = slider("gv-layer-slider", "layer", 0, L - 1, layer)
        self.token_slider = slider("gv-token-slider", "token", 0, n - 1, token)
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
        self.grid_fig.data[0].on_click(lambda trace, points, _: points.xs and self.set_token(int(points.xs[0])))
        self._finish([W.HBox([self.layer_slider, self.token_slider], layout=W.Layout(flex_flow="row wrap")),
                      self.chips, self.strip_fig, flex_row([self.grid_fig, self.probs_fig], width)],
                     "gv-routing-explorer", width)

    # --- controls -> state (each change draws once) ---
    def _on_layer(self, change) -> None:
        self.state.layer = int(change["new"])
        self._changed("chips", "strip")

    def _on_token(self, change) -> None:
        self.state.token = int(change["new"])
        self._changed("chips", "grid", "probs")

    def set_layer(self, layer: int) -> None:
        L = self.experts.shape[0]
        self.layer_slider.value = check_index("layer", layer, L, f"the model has {L} layers")

    def set_token(self, token: int) -> None:
        n = len(self.tokens)
        self.token_slider.value = check_index("token", token, n, f"row {self.state.row} has {n} real tokens")

    # --- state -> figures ---
    def _chips(self) -> str:
        l = self.state.layer
        return F.token_chips_html(self.tokens, self.experts[l], self.gates[l], self.state.token)

    def _strip(self):
        l = self.state.layer
        return F.token_expert_strip(self.tokens, self.experts[l], self.gates[l], l, self.cfg.num_experts)

    def _grid(self):
        return F.routing_grid(self.tokens, self.experts[..., 0], self.gates[..., 0], self.cfg.num_experts,
                              selected=self.state.token)

    def _probs(self):
        t = self.state.token
        return F.router_probs_by_layer(self.probs[:, t], self.experts[:, t], self.gates[:, t], self.tokens[t], t)

    def _draw(self, parts) -> None:
        if "chips" in parts:
            self.chips.value = self._chips()
        if "strip" in parts:
            sync(self.strip_fig, self._strip())
        if "grid" in parts:
            sync(self.grid_fig, self._grid())
        if "probs" in parts:
            sync(self.probs_fig, self._probs())
