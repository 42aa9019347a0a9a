"""Pure figure builders for detect-then-steer (:mod:`grokviz.analysis.steering`): the activation-rate difference
map, the ranked entries with their intervals, and the measured steering effect (numpy / pandas in, ``go.Figure``
out). Legible at 64 layers x 128 experts: no per-cell text beyond 512 cells, only the top entries labelled."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .scale import dense_note, expand_layers, id_ticks, layer_axis, layer_ticks, row_height, shade_dense
from .theme import DIVERGING, apply, axis_title

SET_COLORS = ("#EF553B", "#636EFA")   # first set, second set


def _check_table(table: pd.DataFrame, need: Sequence[str]) -> None:
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing} (expected grokviz.analysis.steering.compare_counts' table)")


def detection_heatmap(diff: np.ndarray, names: Sequence[str] = ("a", "b"), *, layers: Sequence[int] | None = None,
                      num_layers: int | None = None, top: pd.DataFrame | None = None) -> go.Figure:
    """layers x experts map of ``rate_a - rate_b`` (diverging around 0: red = used more by the first set).
    ``top``: ranked rows (layer, expert, rank) marked with their rank; dense layers grey."""
    diff = np.asarray(diff, np.float64)
    rows, n = layer_axis(layers, diff.shape[0], num_layers)
    E = diff.shape[1]
    span = max(float(np.nanmax(np.abs(diff))) if diff.size else 0.0, 1e-6)
    small = n * E <= 512
    z = expand_layers(np.round(diff, 4), rows, n).tolist()
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(E), y=np.arange(n), colorscale=DIVERGING, zmid=0, zmin=-span,
                               zmax=span, hoverongaps=False, xgap=1 if E <= 64 else 0, ygap=1 if n <= 32 else 0,
                               text=expand_layers(np.round(diff, 2), rows, n).tolist() if small else None,
                               texttemplate="%{text}" if small else None,
                               colorbar=dict(title=f"{names[0]} \u2212 {names[1]}"),
                               hovertemplate="layer %{y} expert %{x}: %{z:+.4f}<extra></extra>"))
    if top is not None and len(top):
        _check_table(top, ("layer", "expert", "rank"))
        fig.add_trace(go.Scatter(x=top.expert.to_numpy(), y=top.layer.to_numpy(), mode="markers+text",
                                 text=[f"#{r}" for r in top["rank"]], textposition="top center",
                                 marker=dict(symbol="circle-open", size=14 if E <= 64 else 9, color="black",
                                             line=dict(width=2)),
                                 name="top ranked", hovertemplate="rank %{text}: layer %{y} expert %{x}"
                                                                  "<extra></extra>", showlegend=False))
    n_dense = shade_dense(fig, rows, n)
    fig.update_xaxes(title=axis_title("expert"), **id_ticks(range(E)))
    fig.update_yaxes(title=axis_title("layer"), **layer_ticks(rows, n), range=[n - 0.5, -0.5])
    return apply(fig, title=f"Activation rate: {names[0]} \u2212 {names[1]}{dense_note(n_dense)}",
                 height=max(260, 130 + row_height(n) * n))


def ranked_bars(table: pd.DataFrame, top: int = 15, names: Sequence[str] = ("a", "b")) -> go.Figure:
    """The ``top`` entries of a ranked table (largest |diff| first, at the top) as horizontal bars of ``diff``
    with their interval as error bars, coloured by the set they favour; faded when the interval includes 0."""
    _check_table(table, ("layer", "expert", "diff", "ci_low", "ci_high", "significant"))
    t = table.head(int(top)).iloc[::-1]
    labels = [f"L{l} E{e}" for l, e in zip(t.layer, t.expert)]
    colors = [SET_COLORS[0] if d > 0 else SET_COLORS[1] for d in t["diff"]]
    opacity = [1.0 if s else 0.35 for s in t.significant]
    fig = go.Figure(go.Bar(
        x=np.round(t["diff"].to_numpy(), 5), y=labels, orientation="h",
        marker=dict(color=colors, opacity=opacity),
        error_x=dict(type="data", symmetric=False, array=np.round((t.ci_high - t["diff"]).to_numpy(), 5),
                     arrayminus=np.round((t["diff"] - t.ci_low).to_numpy(), 5), color="#333", thickness=1),
        customdata=np.stack([t.ci_low, t.ci_high, t.rate_a if "rate_a" in t else t["diff"] * 0,
                             t.rate_b if "rate_b" in t else t["diff"] * 0], -1).round(4),
        hovertemplate="%{y}: %{x:+.4f} [%{customdata[0]:+.4f}, %{customdata[1]:+.4f}]<br>"
                      f"{names[0]} %{{customdata[2]:.3f}}, {names[1]} %{{customdata[3]:.3f}}<extra></extra>"))
    fig.add_vline(x=0, line=dict(color="#999"))
    fig.update_xaxes(title=f"activation rate {names[0]} \u2212 {names[1]} (95 % interval)", zeroline=False)
    fig.update_yaxes(type="category", showgrid=False)
    return apply(fig, title=f"Top {len(t)} experts by |difference| (red: {names[0]}, blue: {names[1]}; "
                            "faded: interval includes 0)", height=max(260, 90 + 22 * len(t)))


def steering_effect(effect: pd.DataFrame) -> go.Figure:
    """Two panels from :func:`grokviz.analysis.steering.steering_effect`: the boosted experts' activation rate and
    the mean next-token log-probability of each held-out set, unsteered (grey) vs steered (red)."""
    _check_table(effect, ("set", "state", "rate_boosted", "mean_logprob"))
    sets = list(dict.fromkeys(effect.set))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("boosted experts' activation rate",
                                                        "mean log p of the held-out text"))
    for state, color in (("unsteered", "#999999"), ("steered", "#EF553B")):
        part = effect[effect.state == state].set_index("set").reindex(sets)
        for col, key in ((1, "rate_boosted"), (2, "mean_logprob")):
            fig.add_trace(go.Bar(x=sets, y=np.round(part[key].to_numpy(np.float64), 5), name=state,
                                 marker_color=color, showlegend=col == 1, legendgroup=state,
                                 hovertemplate=f"%{{x}} {state}: %{{y:.4f}}<extra></extra>"), row=1, col=col)
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    fig.update_xaxes(title="held-out set")
    return apply(fig, title="Steering effect on held-out text", height=340)
