"""ExpertLoadDashboard: how the routed slots spread over the experts, pooled over a batch, or over the prompt
(prefill) and the generated tokens (decode) of a :class:`~grokviz.generation.GenerationResult`."""

from __future__ import annotations

import dataclasses

import ipywidgets as W
import numpy as np

from ..analysis import routing as ra
from . import figures as F
from . import generation_figures as G
from . import load_figures as LF
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
PHASES = ("prefill", "decode", "both")
EXPERTS = "blocks.moe.top_k_experts"


def phase_routing(result) -> dict:
    """{phase: (experts [moe layer, batch, seq, k], real [batch, seq])} of a GenerationResult that captured
    ``blocks.moe.top_k_experts``: "prefill" the prompt tokens (left-padded buffer), "decode" the generated
    tokens as they were fed back (steps past a row's stop are not real), "both" the two joined per row (the
    prompt's last token is next to the first generated one)."""
    if EXPERTS not in result.prefill or EXPERTS not in result.steps:
        raise ValueError(f"the generation did not capture {EXPERTS}; pass capture='routing' (or [{EXPERTS!r}]) "
                         f"to generate")
    pre = np.asarray(result.prefill[EXPERTS])                              # [layer, batch, P, k]
    P = pre.shape[2]
    pre_real = np.arange(P)[None] >= P - np.asarray(result.prompt_lengths)[:, None]
    dec = np.moveaxis(np.asarray(result.step(EXPERTS)), 0, 2)              # [layer, batch, steps, k]
    dec_real = np.arange(dec.shape[2])[None] < np.asarray(result.lengths)[:, None]
    return {"prefill": (pre, pre_real), "decode": (dec, dec_real),
            "both": (np.concatenate([pre, dec], axis=2), np.concatenate([pre_real, dec_real], axis=1))}


@dataclasses.dataclass
class LoadState:
    layer: int = 0       # a MoE layer's number
    top: int = 0         # bars and co-activation: the layer's top-N busiest experts (0 = all)
    order: str = "id"    # "id" | "load" | "cluster" (co-activation clusters; the bars follow the same order)
    phase: str = "both"  # a GenerationResult's "prefill" | "decode" | "both" (a Run: always "both")


class ExpertLoadDashboard(View):
    """Load share (layers x experts, dense layers grey), one layer's bars against uniform, co-activation,
    consecutive rates. ``prompt`` may be a list of texts or a token batch: statistics pool all real tokens of
    the batch. Controls: the MoE layer, how many experts the bars and the co-activation map show (``top``),
    and their order (``order``: by id, busiest first, or clustered by co-activation so that experts selected
    together sit side by side; the default for more than 32 experts).

    ``source`` may also be a :class:`~grokviz.generation.GenerationResult` (generated with ``capture="routing"``):
    then a ``phase`` toggle picks the prompt's tokens (prefill), the generated ones (decode) or both for every
    plot, and two more plots compare the phases at the selected layer (each expert's share of the tokens against
    random routing's k/E) and per layer (load CV of each phase against its random baseline, total variation
    between the phases' loads)."""

    def __init__(self, source, prompt=None, *, layer: int | None = None, top: int = 0, order: str | None = None,
                 phase: str = "both", width: int = COLUMN_WIDTH):
        self.generation = hasattr(source, "prefill") and hasattr(source, "steps")
        if self.generation:
            if prompt is not None:
                raise ValueError("a GenerationResult carries its own prompt; give no prompt")
            self.cfg = cfg = source.model.cfg
            self.phases = phase_routing(source)
            n_rows = self.phases["prefill"][0].shape[0]
            self.layers = list(range(n_rows)) if n_rows == cfg.num_layers else [int(l) for l in cfg.moe_layer_ids]
            self.num_layers = cfg.num_layers
        else:
            run = get_run(source, prompt, (EXPERTS,))
            self.cfg = cfg = run.cfg
            self.layers, self.num_layers = routing_layers(run)
            self.phases = {"both": (np.asarray(run.cache[EXPERTS]), run.real)}
        if phase not in self.phases:
            raise ValueError(f"phase={phase!r} must be one of {list(self.phases)}"
                             f"{'' if self.generation else ' (a Run has no prefill/decode split)'}")
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self._phase_stats(phase)
        self._build(layer, top, order, phase, width)

    @classmethod
    def from_stats(cls, stats, *, cfg=None, layer: int | None = None, top: int = 0, order: str | None = None,
                   width: int = COLUMN_WIDTH) -> ExpertLoadDashboard:
        """The dashboard of a dataset's :class:`~grokviz.analysis.dataset.RoutingStats` (what
        :func:`grokviz.analysis.routing_stats` returns, or a study's ``grokviz.study.load(path).routing``) instead
        of one batch: the same plots and controls, from the stats' exact counts (load, co-activation,
        consecutive-token counts). Its rows are the model's MoE layers in order; give the model's ``cfg`` to number
        them as the model does when some layers are dense (default: layers 0 .. rows - 1)."""
        load = np.asarray(getattr(stats, "load", None)) if hasattr(stats, "load") else None
        if load is None or load.ndim != 2 or not hasattr(stats, "coactivation") or not hasattr(stats, "consecutive"):
            raise ValueError(f"from_stats needs a RoutingStats (grokviz.analysis.routing_stats, or "
                             f"grokviz.study.load(path).routing), got {type(stats).__name__}")
        n_rows, E = load.shape
        if E != stats.num_experts or stats.coactivation.shape != (n_rows, E, E):
            raise ValueError(f"RoutingStats with load {load.shape} and co-activation {stats.coactivation.shape} "
                             f"for {stats.num_experts} experts: inconsistent")
        self = cls.__new__(cls)
        self.generation, self.cfg = False, cfg
        if cfg is None:
            self.layers, self.num_layers = list(range(n_rows)), n_rows
        else:
            moe = [int(x) for x in cfg.moe_layer_ids]
            if n_rows not in (len(moe), cfg.num_layers) or cfg.num_experts != E:
                raise ValueError(f"the stats have {n_rows} layers x {E} experts but cfg {cfg.name!r} has "
                                 f"{len(moe)} MoE layers x {cfg.num_experts} experts")
            self.layers = moe if n_rows == len(moe) else list(range(n_rows))
            self.num_layers = cfg.num_layers
        self.num_experts, self.top_k = E, int(stats.top_k)
        self.phases = {"both": None}
        self.n_tokens = int(stats.n_tokens)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.share = load / load.sum(axis=1, keepdims=True)   # as ra.load_share: nan for a layer without tokens
        self.coact = np.asarray(stats.coactivation)
        self.rates = stats.consecutive_rates()
        self._build(layer, top, order, "both", width)
        return self

    def _build(self, layer, top, order, phase, width) -> None:
        E = self.num_experts
        self.baselines = ra.consecutive_baselines(E, self.top_k)
        layer = check_moe_layer("layer", self.layers[0] if layer is None else layer, self.layers, self.num_layers)
        choices = [t for t in TOP_CHOICES if t < E]
        if top and top not in choices:
            raise ValueError(f"top={top!r} must be 0 (all experts) or one of {choices} (fewer than {E} experts)")
        order = ("cluster" if E > 32 else "id") if order is None else order
        if order not in ORDERS:
            raise ValueError(f"order={order!r} must be one of {ORDERS}")
        self._init_view()
        self.state = LoadState(layer=layer, top=top, order=order, phase=phase)
        self.phase_select = W.ToggleButtons(options=list(PHASES), value=phase, description="tokens",
                                            tooltips=["the prompt (prefill)", "the generated tokens (decode)",
                                                      "prompt and generated tokens"],
                                            style={"button_width": "80px"})
        self.phase_select.add_class("gv-load-phase")
        self.layer_slider = moe_layer_slider("gv-load-layer-slider", self.layers, layer)
        self.top_select = W.Dropdown(options=[(f"all {E}", 0)] + [(f"top {t}", t) for t in choices], value=top,
                                     description="experts", layout=W.Layout(width="200px"))
        self.top_select.add_class("gv-load-top")
        self.order_select = W.Dropdown(options=[(ORDER_LABELS[o], o) for o in ORDERS], value=order,
                                       description="order", layout=W.Layout(width="220px"))
        self.order_select.add_class("gv-load-order")
        w_left, w_right = split(width, 52, 48)
        self.heatmap_fig = figure_widget(self._heatmap(), w_left)
        self.rates_fig = figure_widget(self._rates(), w_right)
        self.bars_fig = figure_widget(self._bars(), w_left)
        self.coact_fig = figure_widget(self._coact(), w_right)
        self.figures = [self.heatmap_fig, self.bars_fig, self.coact_fig, self.rates_fig]
        rows = [flex_row([self.heatmap_fig, self.rates_fig], width), flex_row([self.bars_fig, self.coact_fig], width)]
        if self.generation:
            self.phase_fig = figure_widget(self._phase_bars(), w_left)
            self.summary_fig = figure_widget(self._phase_summary(), w_right)
            self.figures += [self.phase_fig, self.summary_fig]
            rows.append(flex_row([self.phase_fig, self.summary_fig], width))
        for w in (self.layer_slider, self.top_select, self.order_select, self.phase_select):
            w.observe(self._on_control, names="value")
        self.heatmap_fig.data[0].on_click(lambda trace, points, _: points.ys and self._clicked(int(points.ys[0])))
        self._finish([W.HBox([*shown(self.phase_select, self.generation), self.layer_slider,
                              *shown(self.top_select, choices), self.order_select],
                             layout=W.Layout(flex_flow="row wrap")), *rows], "gv-load-dashboard", width)

    def _phase_stats(self, phase: str) -> None:
        E = self.num_experts
        experts, real = self.phases[phase]
        self.n_tokens = int(real.sum())
        self.share = ra.load_share(experts, real, E)          # [moe layer, expert]
        self.coact = ra.coactivation(experts, real, E)        # [moe layer, expert, expert]
        self.rates = ra.consecutive_rates(experts, real)

    def phase_loads(self) -> dict:
        """{"prefill"/"decode": (fraction of the phase's tokens sent to each expert [moe layer, expert], tokens)}."""
        E, out = self.cfg.num_experts, {}
        for phase in ("prefill", "decode"):
            experts, real = self.phases[phase]
            n = int(real.sum())
            out[phase] = (ra.expert_load(experts, real, E) / max(n, 1), n)
        return out

    def _on_control(self, change) -> None:
        self.state.layer = int(self.layer_slider.value)
        self.state.top = int(self.top_select.value)
        self.state.order = self.order_select.value
        parts = ["layer"]
        if self.phase_select.value != self.state.phase:
            self.state.phase = self.phase_select.value
            self._phase_stats(self.state.phase)
            parts.append("phase")
        self._changed(*parts)

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
        return F.coactivation_heatmap(self.coact[self.layers.index(l)], l, self.top_k, order=self.state.order,
                                      top=self.state.top or None)

    def __repr__(self):
        st = self.state
        phase = f", phase={st.phase!r}" if self.generation else ""
        return f"ExpertLoadDashboard(layer={st.layer!r}, top={st.top!r}, order={st.order!r}{phase})"

    def _heatmap(self):
        what = {"prefill": "prompt tokens", "decode": "generated tokens", "both": "tokens"}[self.state.phase]
        return F.load_share_heatmap(self.share, f"Expert load share per layer ({self.n_tokens} {what})",
                                    layers=self.layers, num_layers=self.num_layers)

    def _rates(self):
        rate_layers = np.asarray(self.layers)[np.asarray(self.rates["layer"], int)]
        return F.consecutive_rates(rate_layers, self.rates["first_repeat"], self.rates["topk_overlap"],
                                   self.baselines)

    def _phase_bars(self):
        loads = self.phase_loads()
        i = self.layers.index(self.state.layer)
        (pre, n_pre), (dec, n_dec) = loads["prefill"], loads["decode"]
        return G.load_vs_random(pre[i], dec[i], self.cfg.top_k, self.state.layer, n_prefill=n_pre, n_decode=n_dec,
                                top=self.state.top or None)

    def _phase_summary(self):
        E, k = self.cfg.num_experts, self.cfg.top_k
        loads = self.phase_loads()
        cv, cv_random, n = {}, {}, {}
        for phase, (_, count) in loads.items():
            experts, real = self.phases[phase]
            cv[phase] = ra.load_cv(experts, real, E) if count else np.full(len(self.layers), np.nan)
            cv_random[phase] = ra.load_baseline_cv(max(count, 1), E, k)
            n[phase] = count
        tv = 0.5 * np.abs(loads["prefill"][0] / k - loads["decode"][0] / k).sum(-1)
        return LF.phase_summary(self.layers, cv, cv_random, tv, n)

    def _draw(self, parts) -> None:
        if "phase" in parts:
            sync(self.heatmap_fig, self._heatmap())
            sync(self.rates_fig, self._rates())
        sync(self.bars_fig, self._bars())
        sync(self.coact_fig, self._coact())
        if self.generation:
            sync(self.phase_fig, self._phase_bars())
