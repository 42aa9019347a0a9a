"""Routing fragility, drawn (data from :func:`grokviz.analysis.fragility.routing_fragility`).

Pure functions of its frames: :func:`fragility_summary` (per MoE layer: flip rate under each variant and the
share of fragile tokens, as grouped bars), :func:`margin_heatmap` (one window: MoE layers x positions of the top-k
margin, flips marked), :func:`fragile_text_html` (one window's text, each token shaded by its smallest margin
over the chosen layers, flipped tokens boxed); and :class:`FragilityView`, a thin widget over them (window and
layer controls)."""

from __future__ import annotations

import dataclasses
import html

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from .base import COLUMN_WIDTH, View, check_index, figure_widget, sync
from .theme import apply

__all__ = ["fragility_summary", "margin_heatmap", "fragile_text_html", "FragilityView"]

_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756")


def _flip_cols(frame) -> list[str]:
    return [c for c in frame.columns if c.startswith("flip_")]


def fragility_summary(layers, *, threshold: float | None = None) -> go.Figure:
    """Grouped bars per MoE layer: the flip rate under each variant, and the share of tokens whose top-k margin is
    below ``threshold`` (the summary's ``fragile`` column). ``layers``: ``Fragility.layers``. Example::

        fragility_summary(fr.layers, threshold=fr.threshold).show()
    """
    x = [str(int(l)) for l in layers["layer"]]
    fig = go.Figure()
    for i, c in enumerate(_flip_cols(layers)):
        fig.add_trace(go.Bar(x=x, y=layers[c].to_numpy(np.float64), name=f"flips: {c[5:]}",
                             marker_color=_COLORS[i % len(_COLORS)],
                             hovertemplate=f"layer %{{x}}: %{{y:.3%}} of tokens change experts under {c[5:]}"
                                           "<extra></extra>"))
    label = "margin < threshold" if threshold is None else f"margin < {threshold:g}"
    fig.add_trace(go.Bar(x=x, y=layers["fragile"].to_numpy(np.float64), name=label, marker_color="#bbbbbb",
                         hovertemplate="layer %{x}: %{y:.2%} of tokens fragile<extra></extra>"))
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title="MoE layer", type="category")
    fig.update_yaxes(title="share of tokens", tickformat=".1%", rangemode="tozero")
    n = int(layers["n_tokens"].iloc[0]) if len(layers) else 0
    return apply(fig, title=f"Routing fragility per layer ({n:,} tokens)", height=380)


def _window(tokens, window: int):
    w = tokens[tokens["window"] == window]
    if not len(w):
        raise ValueError(f"window {window} is not in the frame (windows 0..{int(tokens['window'].max())})")
    return w


def margin_heatmap(tokens, window: int, *, flip: str | None = None) -> go.Figure:
    """One window: MoE layers x positions, the top-k margin (low = fragile, dark), with an x on every token whose
    selection flips under ``flip`` (a variant name; default the first). ``tokens``: ``Fragility.tokens``."""
    w = _window(tokens, window)
    layers = np.unique(w["layer"].to_numpy())
    pos = np.unique(w["position"].to_numpy())
    z = np.full((len(layers), len(pos)), np.nan)
    li, pi = np.searchsorted(layers, w["layer"].to_numpy()), np.searchsorted(pos, w["position"].to_numpy())
    z[li, pi] = w["margin"].to_numpy()
    labels = w[w["layer"] == layers[0]].set_index("position").reindex(pos)
    text = labels["token"].astype(str).tolist() if "token" in labels else [str(p) for p in pos]
    fig = go.Figure(go.Heatmap(z=np.round(z, 5).tolist(), x=list(range(len(pos))), y=[str(l) for l in layers],
                               colorscale="Magma", colorbar=dict(title="margin"), customdata=[text] * len(layers),
                               hovertemplate="layer %{y} · %{customdata!r}: margin %{z:.4f}<extra></extra>"))
    cols = _flip_cols(w)
    col = f"flip_{flip}" if flip is not None else (cols[0] if cols else None)
    if col is not None:
        if col not in w:
            raise ValueError(f"no variant {flip!r} in the frame (variants: {[c[5:] for c in cols]})")
        f = w[w[col].to_numpy(bool)]
        fig.add_trace(go.Scatter(x=np.searchsorted(pos, f["position"].to_numpy()).tolist(),
                                 y=[str(l) for l in f["layer"]], mode="markers", name=f"flips: {col[5:]}",
                                 marker=dict(symbol="x", color="#00e5ff", size=9), hoverinfo="skip"))
    fig.update_xaxes(title="token", tickmode="array", tickvals=list(range(len(pos))),
                     ticktext=[t.replace("\u2581", " ")[:8] for t in text], tickangle=-60)
    fig.update_yaxes(title="MoE layer", type="category")
    return apply(fig, title=f"Top-k margin, window {window}" + (f" (x: flips under {col[5:]})" if col else ""),
                 height=170 + 40 * len(layers))


def fragile_text_html(tokens, window: int, *, layers=None, threshold: float = 0.01, flip: str | None = None) -> str:
    """One window's text as HTML: each token shaded by its smallest top-k margin over ``layers`` (default all MoE
    layers; red = near a tie, white = far), bold and boxed when below ``threshold``, and outlined in blue where the
    selection flips under ``flip`` (default any variant) at one of those layers; hover shows the margins."""
    w = _window(tokens, window)
    if layers is not None:
        w = w[w["layer"].isin(np.atleast_1d(layers))]
        if not len(w):
            raise ValueError(f"no MoE layer among {layers!r} in the frame")
    cols = _flip_cols(w) if flip is None else [f"flip_{flip}"]
    if any(c not in w for c in cols):
        raise ValueError(f"no variant {flip!r} in the frame (variants: {[c[5:] for c in _flip_cols(w)]})")
    g = w.groupby("position", sort=True)
    margin = g["margin"].min()
    flipped = g[cols].any().any(axis=1) if cols else margin * 0 > 0
    pieces = g["token"].first() if "token" in w else g["token_id"].first().astype(str)
    out = []
    for p in margin.index:
        m = float(margin[p])
        a = float(np.clip(1.0 - m / max(4 * threshold, 1e-12), 0.0, 1.0))      # opacity of the red
        style = f"background: rgba(228, 26, 28, {a:.2f}); padding: 0 1px; border-radius: 2px;"
        if m < threshold:
            style += " font-weight: bold; border-bottom: 2px solid #a00;"
        if bool(flipped[p]):
            style += " outline: 2px solid #1f77b4;"
        text = html.escape(str(pieces[p]).replace("\u2581", " "))
        out.append(f'<span title="position {p}: min margin {m:.4f}" style="{style}">{text}</span>')
    return ('<div class="gv-fragile-text" style="font-family: monospace; line-height: 1.9; white-space: '
            f'pre-wrap;">{"".join(out)}</div>')


@dataclasses.dataclass
class FragilityState:
    window: int = 0
    layer: int = -1          # -1: all MoE layers
    flip: str = ""           # "": any variant


class FragilityView(View):
    """The fragile tokens of one window in the text and the margin heatmap, next to the per-layer summary: a
    window slider, a layer menu (all or one) and a variant menu. ``fragility``: a
    :class:`grokviz.analysis.fragility.Fragility` with its per-token frame. Example::

        FragilityView(gv.analysis.routing_fragility(model, texts))
    """

    def __init__(self, fragility, *, window: int = 0, width: int = COLUMN_WIDTH):
        if fragility.tokens is None:
            raise ValueError("FragilityView needs the per-token frame: run routing_fragility with per_token=True")
        self.fr = fragility
        self._init_view()
        n = int(fragility.tokens["window"].max()) + 1
        self.state = FragilityState(window=check_index("window", window, n, f"the data has {n} windows"))
        layers = sorted(int(l) for l in fragility.layers["layer"])
        self.window_slider = W.IntSlider(value=self.state.window, min=0, max=n - 1, description="window",
                                         continuous_update=False)
        self.layer_select = W.Dropdown(options=[("all", -1)] + [(str(l), l) for l in layers], value=-1,
                                       description="layer")
        self.flip_select = W.Dropdown(options=[("any", "")] + [(v, v) for v in fragility.variants], value="",
                                      description="flips")
        for w, cls in ((self.window_slider, "window"), (self.layer_select, "layer"), (self.flip_select, "flip")):
            w.add_class(f"gv-fragility-{cls}")
            w.observe(self._on_control, names="value")
        self.text = W.HTML(self._text())
        self.summary_fig = figure_widget(fragility_summary(fragility.layers, threshold=fragility.threshold), width)
        self.heat_fig = figure_widget(self._heat(), width)
        self.figures, self.html_parts = [self.heat_fig, self.summary_fig], [self.text]
        controls = W.HBox([self.window_slider, self.layer_select, self.flip_select],
                          layout=W.Layout(flex_flow="row wrap"))
        self._finish([controls, self.text, self.heat_fig, self.summary_fig], "gv-fragility", width)

    def _on_control(self, _change) -> None:
        self.state = FragilityState(int(self.window_slider.value), int(self.layer_select.value),
                                    str(self.flip_select.value))
        self._changed("window")

    def _text(self) -> str:
        s = self.state
        return fragile_text_html(self.fr.tokens, s.window, layers=None if s.layer < 0 else s.layer,
                                 threshold=self.fr.threshold, flip=s.flip or None)

    def _heat(self):
        return margin_heatmap(self.fr.tokens, self.state.window, flip=self.state.flip or None)

    def _draw(self, parts) -> None:
        self.text.value = self._text()
        sync(self.heat_fig, self._heat())
