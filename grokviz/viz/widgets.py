"""Thin ipywidgets + ``go.FigureWidget`` shells over ``grokviz.analysis`` (numbers) and ``figures`` (plots).

Each view keeps its selection in a small state dataclass (``view.state``), re-draws its FigureWidgets in one
``batch_update`` per change, has a cheap ``repr`` and tags its controls with ``gv-*`` CSS classes (browser
tests find them by class). Every view takes a :class:`grokviz.Model` plus a prompt (text or token ids), or a
:class:`grokviz.Run` that already holds the captures it needs.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
from plotly.basedatatypes import BaseFigure

from ..analysis import attention as aa
from ..analysis import routing as ra
from ..api import Run
from ..interventions import Interventions
from . import figures as F

ROUTING_CAPTURE = ("blocks.moe.router_probs", "blocks.moe.top_k_experts", "blocks.moe.top_k_weights")
ATTENTION_CAPTURE = ("blocks.attn.pattern", "blocks.attn.scores", "blocks.attn.logits")


def get_run(source, prompt=None, capture=(), **kw) -> Run:
    """``source`` is a Run holding ``capture`` (returned as is) or a Model / Run to (re-)run on ``prompt``."""
    if isinstance(source, Run):
        if all(c in source.cache for c in capture) and prompt is None and not kw:
            return source
        source, prompt = source.model, source.tokens if prompt is None else prompt
    if prompt is None:
        raise ValueError("give a prompt (text or token ids [batch, seq]) to run the model on")
    return source.run(prompt, capture=list(capture), **kw)


def sync(fw: go.FigureWidget, fig: go.Figure) -> None:
    """Make FigureWidget ``fw`` show ``fig``: one batched message for data and layout."""
    same = len(fw.data) == len(fig.data) and all(a.type == b.type for a, b in zip(fw.data, fig.data))
    if not same:
        with fw.batch_update():
            fw.data = []
            fw.add_traces(list(fig.data))
            fw.layout.update(fig.layout.to_plotly_json(), overwrite=True)
        return
    with fw.batch_update():
        for old, new in zip(fw.data, fig.data):
            old.update(new.to_plotly_json(), overwrite=True)
        fw.layout.update(fig.layout.to_plotly_json(), overwrite=True)


def _fw(width: int | None = None) -> go.FigureWidget:
    """An empty FigureWidget; ``width`` keeps side-by-side figures inside a notebook column."""
    return go.FigureWidget(layout=dict(width=width) if width else None)


def _slider(cls: str, description: str, lo: int, hi: int, value: int) -> W.IntSlider:
    s = W.IntSlider(value=value, min=lo, max=max(hi, lo), description=description, continuous_update=False,
                    layout=W.Layout(width="420px"))
    s.add_class(cls)
    return s


class _View(W.VBox):
    """Base: ``figures`` lists the view's FigureWidgets (in display order) for export_html."""

    figures: list
    html_parts: list

    def _export_parts(self) -> list:
        return [("html", h.value) for h in getattr(self, "html_parts", [])] + [("fig", f) for f in self.figures]

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.state).items()
                           if not isinstance(v, (list, tuple, set, frozenset)) or len(v) <= 8)
        return f"{type(self).__name__}({fields})"


# ---------------------------------------------------------------------------------------------- routing --

@dataclasses.dataclass
class RoutingState:
    layer: int = 0
    token: int = 0
    row: int = 0


class RoutingExplorer(_View):
    """Tokens coloured by selected expert at a layer (slider), token x layer grid of first choices, and the
    selected token's router probabilities at every layer (gates as used: un-renormalised)."""

    def __init__(self, source, prompt=None, *, row: int = 0, layer: int = 0, token: int | None = None):
        run = get_run(source, prompt, ROUTING_CAPTURE)
        n = int(run.real[row].sum())
        self.cfg = run.model.cfg
        self.tokens = run.str_tokens(row)[:n]
        self.experts = np.asarray(run.cache["blocks.moe.top_k_experts"])[:, row, :n]    # [layer, seq, k]
        self.gates = np.asarray(run.cache["blocks.moe.top_k_weights"])[:, row, :n]      # [layer, seq, k]
        self.probs = np.asarray(run.cache["blocks.moe.router_probs"])[:, row, :n]       # [layer, seq, expert]
        L = self.experts.shape[0]
        self.state = RoutingState(layer=layer, token=n - 1 if token is None else token, row=row)
        self.layer_slider = _slider("gv-layer-slider", "layer", 0, L - 1, layer)
        self.token_slider = _slider("gv-token-slider", "token", 0, n - 1, self.state.token)
        self.chips = W.HTML()
        self.chips.add_class("gv-token-chips")
        self.strip_fig, self.grid_fig, self.probs_fig = _fw(1150), _fw(640), _fw(520)
        self.figures = [self.strip_fig, self.grid_fig, self.probs_fig]
        self.html_parts = [self.chips]
        self.layer_slider.observe(lambda ch: self.set_layer(ch["new"]), names="value")
        self.token_slider.observe(lambda ch: self.set_token(ch["new"]), names="value")
        self._draw_layer()
        self._draw_token()
        self.grid_fig.data[0].on_click(lambda trace, points, _: points.xs and self.set_token(int(points.xs[0])))
        super().__init__([W.HBox([self.layer_slider, self.token_slider]), self.chips, self.strip_fig,
                          W.HBox([self.grid_fig, self.probs_fig])])
        self.add_class("gv-routing-explorer")

    def set_layer(self, layer: int) -> None:
        self.state.layer = int(layer)
        self.layer_slider.value = self.state.layer
        self._draw_layer()

    def set_token(self, token: int) -> None:
        self.state.token = int(token)
        self.token_slider.value = self.state.token
        self._draw_token()

    def _draw_layer(self) -> None:
        l, E = self.state.layer, self.cfg.num_experts
        self.chips.value = F.token_chips_html(self.tokens, self.experts[l], self.gates[l], self.state.token)
        sync(self.strip_fig, F.token_expert_strip(self.tokens, self.experts[l], self.gates[l], l, E))

    def _draw_token(self) -> None:
        t, l, E = self.state.token, self.state.layer, self.cfg.num_experts
        self.chips.value = F.token_chips_html(self.tokens, self.experts[l], self.gates[l], t)
        sync(self.grid_fig, F.routing_grid(self.tokens, self.experts[..., 0], self.gates[..., 0], E, selected=t))
        sync(self.probs_fig, F.router_probs_by_layer(self.probs[:, t], self.experts[:, t], self.gates[:, t],
                                                     self.tokens[t], t))


# ------------------------------------------------------------------------------------------------- load --

@dataclasses.dataclass
class LoadState:
    layer: int = 0


class ExpertLoadDashboard(_View):
    """Load share (layers x experts), one layer's bars against uniform, co-activation, consecutive rates.
    ``prompt`` may be a list of texts or a token batch: statistics pool all real tokens of the batch."""

    def __init__(self, source, prompt=None, *, layer: int = 0):
        run = get_run(source, prompt, ("blocks.moe.top_k_experts",))
        self.cfg = cfg = run.model.cfg
        experts, real = np.asarray(run.cache["blocks.moe.top_k_experts"]), run.real
        self.n_tokens = int(real.sum())
        self.share = ra.load_share(experts, real, cfg.num_experts)          # [layer, expert]
        self.coact = ra.coactivation(experts, real, cfg.num_experts)        # [layer, expert, expert]
        self.rates = ra.consecutive_rates(experts, real)
        self.baselines = ra.consecutive_baselines(cfg.num_experts, cfg.top_k)
        self.state = LoadState(layer=layer)
        self.layer_slider = _slider("gv-load-layer-slider", "layer", 0, self.share.shape[0] - 1, layer)
        self.layer_slider.observe(lambda ch: self.set_layer(ch["new"]), names="value")
        title = f"Expert load share per layer ({self.n_tokens} tokens)"
        self.heatmap_fig = _fw(600)
        sync(self.heatmap_fig, F.load_share_heatmap(self.share, title))
        self.bars_fig, self.coact_fig = _fw(600), _fw(480)
        self.rates_fig = _fw(560)
        sync(self.rates_fig, F.consecutive_rates(self.rates["layer"], self.rates["first_repeat"],
                                                 self.rates["topk_overlap"], self.baselines))
        self.figures = [self.heatmap_fig, self.bars_fig, self.coact_fig, self.rates_fig]
        self._draw()
        self.heatmap_fig.data[0].on_click(lambda trace, points, _: points.ys and self.set_layer(int(points.ys[0])))
        super().__init__([self.layer_slider, W.HBox([self.heatmap_fig, self.rates_fig]),
                          W.HBox([self.bars_fig, self.coact_fig])])
        self.add_class("gv-load-dashboard")

    def set_layer(self, layer: int) -> None:
        self.state.layer = int(layer)
        self.layer_slider.value = self.state.layer
        self._draw()

    def _draw(self) -> None:
        l = self.state.layer
        sync(self.bars_fig, F.load_bars(self.share[l], l))
        sync(self.coact_fig, F.coactivation_heatmap(self.coact[l], l, self.cfg.top_k))


# -------------------------------------------------------------------------------------------- attention --

@dataclasses.dataclass
class AttentionState:
    layer: int = 0
    head: int = 0
    row: int = 0


class AttentionExplorer(_View):
    """Layer slider and head selector (query heads grouped by KV head), the pattern with token labels,
    pre-cap vs capped scores, and per-head summaries of the layer."""

    def __init__(self, source, prompt=None, *, row: int = 0, layer: int = 0, head: int = 0):
        run = get_run(source, prompt, ATTENTION_CAPTURE)
        n = int(run.real[row].sum())
        self.cfg = cfg = run.model.cfg
        self.tokens = run.str_tokens(row)[:n]
        self.pattern = np.asarray(run.cache["blocks.attn.pattern"])[:, row, :, :n, :n]   # [layer, head, seq, kv_seq]
        self.scores = np.asarray(run.cache["blocks.attn.scores"])[:, row, :, :n, :n]
        self.logits = np.asarray(run.cache["blocks.attn.logits"])[:, row, :, :n, :n]
        self.state = AttentionState(layer=layer, head=head, row=row)
        g = cfg.group_size
        self.layer_slider = _slider("gv-attn-layer-slider", "layer", 0, self.pattern.shape[0] - 1, layer)
        options = [(f"KV {h // g} \u00b7 head {h}", h) for h in range(cfg.num_q_heads)]
        self.head_select = W.Dropdown(options=options, value=head, description="head")
        self.head_select.add_class("gv-head-select")
        self.layer_slider.observe(lambda ch: self.set(layer=ch["new"]), names="value")
        self.head_select.observe(lambda ch: self.set(head=ch["new"]), names="value")
        self.pattern_fig, self.cap_fig, self.summary_fig = _fw(620), _fw(540), _fw(540)
        self.figures = [self.pattern_fig, self.cap_fig, self.summary_fig]
        self._causal = np.tril(np.ones((n, n), bool))
        full, real = np.asarray(run.cache["blocks.attn.pattern"])[:, row:row + 1], run.real[row:row + 1]
        self.summary = {"entropy (nats)": aa.head_entropy(full, real),           # each [layer, head]
                        "first-token mass": aa.first_token_attention(full, real),
                        "previous-token": aa.previous_token_score(full, real)}
        self._draw()
        super().__init__([W.HBox([self.layer_slider, self.head_select]),
                          W.HBox([self.pattern_fig, W.VBox([self.cap_fig, self.summary_fig])])])
        self.add_class("gv-attention-explorer")

    def set(self, *, layer: int | None = None, head: int | None = None) -> None:
        if layer is not None:
            self.state.layer = int(layer)
            self.layer_slider.value = self.state.layer
        if head is not None:
            self.state.head = int(head)
            self.head_select.value = self.state.head
        self._draw()

    def _draw(self) -> None:
        l, h, g = self.state.layer, self.state.head, self.cfg.group_size
        sync(self.pattern_fig, F.attention_pattern(self.pattern[l, h], self.tokens, l, h, h // g))
        sync(self.cap_fig, F.precap_vs_capped(self.logits[l, h][self._causal], self.scores[l, h][self._causal],
                                              self.cfg.attn_softcap, l, h))
        sync(self.summary_fig, F.head_summaries({k: v[l] for k, v in self.summary.items()}, l, g))


# --------------------------------------------------------------------------------------------- ablation --

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def next_token_loss(logits: np.ndarray, tokens: np.ndarray, real: np.ndarray) -> float:
    """Mean next-token cross-entropy (nats) over positions whose token and next token are both real."""
    logp = _log_softmax(logits[:, :-1])
    target = tokens[:, 1:]
    nll = -np.take_along_axis(logp, target[..., None], -1)[..., 0]
    mask = real[:, 1:] & real[:, :-1]
    return float((nll * mask).sum() / max(int(mask.sum()), 1))


@dataclasses.dataclass
class AblationState:
    removed: set = dataclasses.field(default_factory=set)   # {(layer, expert)}
    heads: set = dataclasses.field(default_factory=set)     # {(layer, head)}
    mode: str = "remove"                                    # "remove": reroute; "zero": keep routing, zero output

    def interventions(self, base: Interventions) -> Interventions:
        """The Interventions for this state (same shapes as ``base``: never recompiles)."""
        rm = np.zeros(base.expert_remove.shape, bool)
        scale = np.ones(base.expert_scale.shape, np.float32)
        heads = np.ones(base.head_scale.shape, np.float32)
        for l, e in self.removed:
            if self.mode == "remove":
                rm[l, e] = True
            else:
                scale[l, e] = 0.0
        for l, h in self.heads:
            heads[l, h] = 0.0
        return dataclasses.replace(base, expert_remove=rm, expert_scale=scale, head_scale=heads)


class AblationLab(_View):
    """Checkboxes (layers x experts) and head toggles; each change re-runs the model with the intervention
    (values only: no recompile) and shows the change in next-token distribution, loss and routing."""

    def __init__(self, model, prompt, *, row: int = 0, show_heads: bool = True):
        self.model, self.cfg, self.row = model, model.cfg, row
        self.tokens_in = model.to_tokens(prompt)
        self._iv0 = Interventions.none(self.cfg)
        self.state = AblationState()
        base = self._run(self._iv0)
        self.base = base
        self.n = int(base["real"][row].sum())
        self.str_tokens = base["run"].str_tokens(row)
        self.vocab_labels = _VocabLabels(model)
        L, E, H = self.cfg.num_layers, self.cfg.num_experts, self.cfg.num_q_heads
        self.expert_boxes = {}
        rows = []
        for l in range(L):
            boxes = []
            for e in range(E):
                cb = W.Checkbox(value=False, description=f"E{e}", indent=False, layout=W.Layout(width="52px"))
                cb.add_class("gv-ablation-checkbox")
                cb.observe(lambda ch, l=l, e=e: self.toggle_expert(l, e, ch["new"]), names="value")
                self.expert_boxes[l, e] = cb
                boxes.append(cb)
            rows.append(W.HBox([W.Label(f"layer {l}", layout=W.Layout(width="60px"))] + boxes))
        self.head_boxes = {}
        head_rows = []
        for l in range(L if show_heads else 0):
            boxes = []
            for h in range(H):
                tb = W.ToggleButton(value=False, description=f"h{h}", tooltip=f"ablate layer {l} head {h}",
                                    layout=W.Layout(width="48px"))
                tb.add_class("gv-head-toggle")
                tb.observe(lambda ch, l=l, h=h: self.toggle_head(l, h, ch["new"]), names="value")
                self.head_boxes[l, h] = tb
                boxes.append(tb)
            head_rows.append(W.HBox([W.Label(f"layer {l}", layout=W.Layout(width="60px"))] + boxes))
        self.mode_select = W.ToggleButtons(options=[("remove (reroute)", "remove"), ("zero output", "zero")],
                                           value="remove", description="experts")
        self.mode_select.add_class("gv-ablation-mode")
        self.mode_select.observe(lambda ch: self.set_mode(ch["new"]), names="value")
        self.reset_button = W.Button(description="reset")
        self.reset_button.on_click(lambda _: self.reset())
        self.summary = W.HTML()
        self.summary.add_class("gv-ablation-summary")
        self.dist_fig, self.route_fig = _fw(620), _fw(560)
        self.figures = [self.dist_fig, self.route_fig]
        self.html_parts = [self.summary]
        self.update()
        controls = W.VBox([W.HBox([self.mode_select, self.reset_button]), W.Label("experts"), *rows]
                          + ([W.Label("attention heads")] + head_rows if head_rows else []))
        super().__init__([controls, self.summary, W.HBox([self.dist_fig, self.route_fig])])
        self.add_class("gv-ablation-lab")

    def _run(self, iv: Interventions) -> dict:
        run = self.model.run(self.tokens_in, capture=["blocks.moe.top_k_experts"], interventions=iv)
        logits = np.asarray(run.logits)
        return dict(run=run, logits=logits, real=run.real,
                    first=np.asarray(run.cache["blocks.moe.top_k_experts"])[..., 0],   # [layer, batch, seq]
                    loss=next_token_loss(logits, run.tokens, run.real))

    # --- controls -> state ---
    def toggle_expert(self, layer: int, expert: int, on: bool = True) -> None:
        (self.state.removed.add if on else self.state.removed.discard)((layer, expert))
        self.expert_boxes[layer, expert].value = bool(on)
        self.update()

    def toggle_head(self, layer: int, head: int, on: bool = True) -> None:
        (self.state.heads.add if on else self.state.heads.discard)((layer, head))
        if (layer, head) in self.head_boxes:
            self.head_boxes[layer, head].value = bool(on)
        self.update()

    def set_mode(self, mode: str) -> None:
        self.state.mode = mode
        self.mode_select.value = mode
        self.update()

    def reset(self) -> None:
        self.state.removed.clear()
        self.state.heads.clear()
        for w in [*self.expert_boxes.values(), *self.head_boxes.values()]:
            w.value = False
        self.update()

    # --- state -> view ---
    def update(self) -> None:
        """Re-run with the current interventions and redraw (one message per figure)."""
        new = self.current = self._run(self.state.interventions(self._iv0))
        r, last = self.row, self.n - 1
        p0 = np.exp(_log_softmax(self.base["logits"][r, last]))
        p1 = np.exp(_log_softmax(new["logits"][r, last]))
        kl = float(np.sum(p0 * (np.log(np.maximum(p0, 1e-30)) - np.log(np.maximum(p1, 1e-30)))))
        b0, b1 = self.base["first"][:, r, :self.n], new["first"][:, r, :self.n]
        changed = float((b0 != b1).mean())
        what = ", ".join([f"L{l}E{e}" for l, e in sorted(self.state.removed)]
                         + [f"L{l}h{h}" for l, h in sorted(self.state.heads)]) or "nothing"
        self.summary.value = (f"<b>ablated ({self.state.mode}):</b> {what} &nbsp; <b>loss</b> "
                              f"{self.base['loss']:.4f} \u2192 {new['loss']:.4f} ({new['loss'] - self.base['loss']:+.4f})"
                              f" &nbsp; <b>KL(next token)</b> {kl:.4f} &nbsp; <b>routing changed</b> {changed:.1%}")
        extra = f" after token {last} {F.show_token(self.str_tokens[last])!r} (KL {kl:.3f})"
        sync(self.dist_fig, F.next_token_change(p0, p1, self.vocab_labels, title_extra=extra))
        sync(self.route_fig, F.routing_change(b0, b1, self.str_tokens[:self.n], self.cfg.num_experts))


class _VocabLabels:
    """Token id -> piece, looked up lazily (a real vocabulary has 131k entries; a plot shows about 20)."""

    def __init__(self, model):
        self.tok = model.tokenizer
        self.n = int(self.tok.vocab_size) if self.tok is not None else 0

    def __getitem__(self, i: int) -> str:
        i = int(i)
        return self.tok.id_to_piece(i) if i < self.n else str(i)


# ------------------------------------------------------------------------------------------------- flow --

@dataclasses.dataclass
class FlowState:
    first_layer: int = 0
    last_layer: int = 1


class RoutingFlow(_View):
    """Sankey of first-choice expert paths across consecutive layers (range slider picks the layers)."""

    def __init__(self, source, prompt=None, *, layers: tuple[int, int] | None = None):
        run = get_run(source, prompt, ("blocks.moe.top_k_experts",))
        self.cfg = run.model.cfg
        self.experts, self.real = np.asarray(run.cache["blocks.moe.top_k_experts"]), run.real
        L = self.experts.shape[0]
        if L < 2:
            raise ValueError("a routing flow needs at least 2 layers")
        a, b = layers if layers is not None else (0, min(L - 1, 4))
        self.state = FlowState(a, b)
        self.range_slider = W.IntRangeSlider(value=(a, b), min=0, max=L - 1, description="layers",
                                             continuous_update=False, layout=W.Layout(width="420px"))
        self.range_slider.add_class("gv-flow-range")
        self.range_slider.observe(lambda ch: self.set_layers(*ch["new"]), names="value")
        self.fig = _fw(1100)
        self.figures = [self.fig]
        self._draw()
        super().__init__([self.range_slider, self.fig])
        self.add_class("gv-routing-flow")

    def set_layers(self, first: int, last: int) -> None:
        first, last = int(first), int(last)
        if last <= first:  # a flow needs two layers
            first, last = (first, first + 1) if first + 1 < self.experts.shape[0] else (first - 1, first)
        self.state = FlowState(first, last)
        self.range_slider.value = (first, last)
        self._draw()

    def _draw(self) -> None:
        s = self.state
        flows = [ra.routing_flow(self.experts, self.real, l, self.cfg.num_experts)
                 for l in range(s.first_layer, s.last_layer)]
        sync(self.fig, F.routing_sankey(flows, s.first_layer))


# ----------------------------------------------------------------------------------------------- export --

def export_html(view, path, *, title: str = "grokviz") -> Path:
    """Write a figure or a grokviz view as one standalone HTML file (plotly.js inlined: works offline).

    The file is written to a temporary sibling and renamed into place, so readers never see half a file."""
    path = Path(path)
    if isinstance(view, BaseFigure):  # go.Figure and go.FigureWidget
        parts = [("fig", view)]
    elif hasattr(view, "_export_parts"):
        parts = view._export_parts()
    else:
        raise TypeError(f"export_html takes a plotly figure or a grokviz view, got {type(view).__name__}")
    body, js_done = [], False
    for kind, item in parts:
        if kind == "html":
            body.append(f"<div>{item}</div>")
        else:
            fig = go.Figure(item.to_dict())
            body.append(fig.to_html(full_html=False, include_plotlyjs=not js_done))
            js_done = True
    doc = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
           f'<body style="font-family:DejaVu Sans, Arial, sans-serif">\n' + "\n".join(body) + "\n</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(doc)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
