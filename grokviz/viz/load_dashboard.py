"""ExpertLoadDashboard: how the routed slots spread over the experts, pooled over a batch."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..analysis import routing as ra
from . import figures as F
from .base import COLUMN_WIDTH, View, check_index, figure_widget, flex_row, get_run, slider, split, sync


@dataclasses.dataclass
class LoadState:
    layer: int = 0


class ExpertLoadDashboard(View):
    """Load share (layers x experts), one layer's bars against uniform, co-activation, consecutive rates.
    ``prompt`` may be a list of texts or a token batch: statistics pool all real tokens of the batch."""

    def __init__(self, source, prompt=None, *, layer: int = 0, width: int = COLUMN_WIDTH):
        run = get_run(source, prompt, ("blocks.moe.top_k_experts",))
        self.cfg = cfg = run.cfg
        experts, real = np.asarray(run.cache["blocks.moe.top_k_experts"]), run.real
        self.n_tokens = int(real.sum())
        self.share = ra.load_share(experts, real, cfg.num_experts)          # [layer, expert]
        self.coact = ra.coactivation(experts, real, cfg.num_experts)        # [layer, expert, expert]
        self.rates = ra.consecutive_rates(experts, real)
        self.baselines = ra.consecutive_baselines(cfg.num_experts, cfg.top_k)
        L = self.share.shape[0]
        layer = check_index("layer", layer, L, f"the model has {L} layers")
        self._init_view()
        self.state = LoadState(layer=layer)
        self.layer_slider = slider("gv-load-layer-slider", "layer", 0, L - 1, layer)
        w_left, w_right = split(width, 52, 48)
        title = f"Expert load share per layer ({self.n_tokens} tokens)"
        self.heatmap_fig = figure_widget(F.load_share_heatmap(self.share, title), w_left)
        self.rates_fig = figure_widget(F.consecutive_rates(self.rates["layer"], self.rates["first_repeat"],
                                                           self.rates["topk_overlap"], self.baselines), w_right)
        self.bars_fig = figure_widget(self._bars(), w_left)
        self.coact_fig = figure_widget(self._coact(), w_right)
        self.figures = [self.heatmap_fig, self.bars_fig, self.coact_fig, self.rates_fig]
        self.layer_slider.observe(self._on_layer, names="value")
        self.heatmap_fig.data[0].on_click(lambda trace, points, _: points.ys and self.set_layer(int(points.ys[0])))
        self._finish([self.layer_slider, flex_row([self.heatmap_fig, self.rates_fig], width),
                      flex_row([self.bars_fig, self.coact_fig], width)], "gv-load-dashboard", width)

    def _on_layer(self, change) -> None:
        self.state.layer = int(change["new"])
        self._changed("layer")

    def set_layer(self, layer: int) -> None:
        L = self.share.shape[0]
        self.layer_slider.value = check_index("layer", layer, L, f"the model has {L} layers")

    def _bars(self):
        return F.load_bars(self.share[self.state.layer], self.state.layer)

    def _coact(self):
        l = self.state.layer
        return F.coactivation_heatmap(self.coact[l], l, self.cfg.top_k)

    def _draw(self, parts) -> None:
        sync(self.bars_fig, self._bars())
        sync(self.coact_fig, self._coact())
