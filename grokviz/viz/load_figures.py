"""Pure figure builders for expert load, co-activation, consecutive-token rates and routing flow (numpy in,
``go.Figure`` out; re-exported by :mod:`.figures`). ``layers``/``num_layers`` as there: the layer number of each
routing row and the model's layer count, dense layers drawn as grey rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .scale import (
    dense_note,
    expand_layers,
    expert_order,
    finite,
    id_ticks,
    layer_axis,
    layer_ticks,
    row_height,
    shade_dense,
    thin,
    top_experts,
)
from .theme import DIVERGING, SEQUENTIAL, UNIFORM_COLOR, apply, axis_title, expert_color

ORDER_WORDS = {"id": "by id", "load": "busiest first", "cluster": "clustered by co-activation"}


def load_share_heatmap(share: np.ndarray, title: str = "Expert load share per layer", *,
                       layers: Sequence[int] | None = None, num_layers: int | None = None) -> go.Figure:
    """layers x experts heatmap of the share of routed slots; diverging around the uniform share 1/E."""
    share = np.asarray(share, np.float64)
    rows, n = layer_axis(layers, share.shape[0], num_layers)
    E = share.shape[1]
    u = 1.0 / E
    span = max(float(np.abs(share - u).max()), 1e-6)
    small = n * E <= 512
    z = np.round(share, 5)
    fig = go.Figure(go.Heatmap(z=z if rows == list(range(n)) else expand_layers(z, rows, n).tolist(),
                               x=np.arange(E), y=np.arange(n), colorscale=DIVERGING, zmid=u, zmin=u - span,
                               zmax=u + span, hoverongaps=False,
                               text=expand_layers(np.round(share, 2), rows, n).tolist() if small else None,
                               texttemplate="%{text}" if small else None, xgap=1 if E <= 64 else 0,
                               ygap=1 if n <= 32 else 0, colorbar=dict(title="share"),
                               hovertemplate="layer %{y} expert %{x}: %{z:.4f}<extra></extra>"))
    n_dense = shade_dense(fig, rows, n)
    fig.update_xaxes(title=axis_title("expert"), **id_ticks(range(E)))
    fig.update_yaxes(title=axis_title("layer"), **layer_ticks(rows, n))
    return apply(fig, title=f"{title} (uniform = {u:.3f}{dense_note(n_dense)})",
                 height=max(250, 120 + row_height(n) * n))


def load_bars(share: np.ndarray, layer: int, *, experts: Sequence[int] | None = None) -> go.Figure:
    """One layer's load share per expert, with the uniform share 1/E marked. ``experts``: which experts to show,
    in that order (default all, by id); hover names each bar's expert."""
    share = np.asarray(share, np.float64)
    E = share.shape[0]
    ids = np.arange(E) if experts is None else np.asarray(experts, int)
    fig = go.Figure(go.Bar(x=np.arange(len(ids)), y=share[ids], customdata=ids,
                           marker_color=[expert_color(e, E) for e in ids], name="share",
                           marker_line_width=0 if len(ids) > 64 else None,
                           hovertemplate="expert %{customdata}: %{y:.4f}<extra></extra>"))
    fig.add_hline(y=1.0 / E, line=dict(color=UNIFORM_COLOR, dash="dash"), annotation_text="uniform 1/E",
                  annotation_position="top right")
    shown = "" if len(ids) == E and np.array_equal(ids, np.arange(E)) else f" ({len(ids)} of {E} experts)"
    fig.update_xaxes(title=axis_title("expert"), **id_ticks(ids))
    fig.update_yaxes(title="share of routed slots", rangemode="tozero")
    fig.update_layout(bargap=0.1 if len(ids) > 32 else None)
    return apply(fig, title=f"Layer {layer} expert load share{shown}", height=300)


def coactivation_conditional(co: np.ndarray) -> np.ndarray:
    """P(j selected | i selected) = C[i, j] / C[i, i] from co-activation counts (diagonal = load); NaN on the
    diagonal and for unused experts."""
    co = np.asarray(co, np.float64)
    diag = np.diag(co).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = np.where(diag[:, None] > 0, co / np.where(diag > 0, diag, 1)[:, None], np.nan)
    np.fill_diagonal(cond, np.nan)
    return cond


def coactivation_heatmap(co: np.ndarray, layer: int, k: int | None = None, *, order: str = "id",
                         top: int | None = None) -> go.Figure:
    """Expert co-activation as P(expert j also selected | expert i selected), from [expert, expert] counts whose
    diagonal is each expert's load (grokviz.analysis.routing.coactivation). Uniform random top-k routing gives
    (k - 1) / (E - 1) everywhere off the diagonal.

    ``top``: only the ``top`` busiest experts; ``order``: "id", "load" (busiest first) or "cluster" (experts
    often selected together placed side by side). Rows and columns share the order; ticks and hover name the
    expert ids."""
    co = np.asarray(co, np.float64)
    E = co.shape[0]
    ids = expert_order(co, order, top)
    cond = coactivation_conditional(co)[np.ix_(ids, ids)]
    n = len(ids)
    text = np.where(np.isnan(cond), "", np.char.mod("%.2f", np.nan_to_num(cond))) if n <= 16 else None
    names = [f"E{i}" for i in ids]                # category axes: hover names the ids, rows/columns keep the order
    fig = go.Figure(go.Heatmap(z=finite(np.round(cond, 4)), x=names, y=names, colorscale=SEQUENTIAL,
                               xgap=1 if n <= 32 else 0, ygap=1 if n <= 32 else 0, text=text,
                               texttemplate="%{text}" if text is not None else None, zmin=0, zmax=1,
                               hoverongaps=False,
                               hovertemplate="P(%{x} | %{y}) = %{z:.3f}<extra></extra>"))
    ticks = [names[p] for p in thin(n)]
    fig.update_xaxes(title="also selected: expert j", type="category", tickmode="array", tickvals=ticks)
    fig.update_yaxes(title="selected: expert i", type="category", tickmode="array", tickvals=ticks,
                     autorange="reversed")
    base = f" (random: {(k - 1) / (E - 1):.3f})" if k and E > 1 else ""
    subset = f"<br>{n} of {E} experts, {ORDER_WORDS[order]}" if n < E or order != "id" else ""
    fig.update_layout(margin=dict(t=70) if subset else None)
    return apply(fig, title=f"Layer {layer} co-activation P(j | i){base}{subset}", height=340 if n <= 32 else 420)


def consecutive_rates(layers: np.ndarray, first_repeat: np.ndarray, topk_overlap: np.ndarray,
                      baselines: Mapping[str, float]) -> go.Figure:
    """How often consecutive tokens share their first choice / top-k experts, per layer (``layers``: the layer
    numbers), against the rate expected under random (uniform, independent) routing."""
    fig = go.Figure()
    for key, values, color in (("first_repeat", first_repeat, "#636EFA"), ("topk_overlap", topk_overlap, "#EF553B")):
        fig.add_trace(go.Scatter(x=np.asarray(layers), y=finite(values), mode="lines+markers",
                                 name=key.replace("_", " "), line=dict(color=color),
                                 hovertemplate="layer %{x}: %{y:.3f}"))
        if key in baselines:
            fig.add_hline(y=float(baselines[key]), line=dict(color=color, dash="dot"),
                          annotation_text=f"random {key.replace('_', ' ')}", annotation_position="top left")
    fig.update_xaxes(title=axis_title("layer"))
    fig.update_yaxes(title="rate over consecutive token pairs", rangemode="tozero")
    fig.update_layout(legend=dict(orientation="h", y=-0.25, x=0))
    return apply(fig, title="Consecutive-token routing vs random baseline", height=340)


def routing_sankey(flows: Sequence[np.ndarray], first_layer: int = 0, min_count: float = 0, *,
                   layers: Sequence[int] | None = None, top: int | None = None) -> go.Figure:
    """Sankey of first-choice expert paths: flows[i] is [E, E] counts from routing layer i to routing layer i+1.
    ``layers``: the layer number of each column (default first_layer, first_layer+1, ...; with dense layers
    between them the flow skips those). ``top``: per column, the ``top`` experts with the most tokens keep
    their own node and the rest share one "other" node."""
    flows = [np.asarray(f, np.float64) for f in flows]
    E = flows[0].shape[0]
    n_cols = len(flows) + 1
    cols = list(range(first_layer, first_layer + n_cols)) if layers is None else [int(l) for l in layers]
    if len(cols) != n_cols:
        raise ValueError(f"layers names {len(cols)} layers for a flow over {n_cols} columns")
    volume = [flows[0].sum(1)] + [f.sum(0) for f in flows]            # tokens at each expert of each column
    node_of, labels, colors = [], [], []                               # node_of[c][e] -> node index
    for c, vol in enumerate(volume):
        keep = top_experts(vol, top)
        m = np.full(E, -1)
        for e in np.sort(keep):
            m[e] = len(labels)
            labels.append(f"L{cols[c]} E{e}")
            colors.append(expert_color(e, E))
        if len(keep) < E:
            m[m < 0] = len(labels)
            labels.append(f"L{cols[c]} other ({E - len(keep)})")
            colors.append("#bbbbbb")
        node_of.append(m)
    links: dict = {}
    for i, f in enumerate(flows):
        a, b = np.nonzero(f > min_count)
        for s, d, v in zip(node_of[i][a].tolist(), node_of[i + 1][b].tolist(), f[a, b].tolist()):
            links[s, d] = links.get((s, d), 0.0) + v
    src, dst = [s for s, _ in links], [d for _, d in links]
    lcol = [_rgba(colors[s], 0.35) for s in src]
    fig = go.Figure(go.Sankey(arrangement="fixed",
                              node=dict(label=labels, color=colors, pad=8 if len(labels) <= 64 else 3,
                                        thickness=12),
                              link=dict(source=src, target=dst, value=list(links.values()), color=lcol)))
    skipped = "" if cols == list(range(cols[0], cols[-1] + 1)) else " (MoE layers only)"
    subset = f", top {top} experts per layer" if top and top < E else ""
    return apply(fig, title=f"First-choice routing flow, layers {cols[0]}\u2013{cols[-1]}{skipped}{subset}",
                 height=420 if len(labels) <= 12 * n_cols else 560)


def _rgba(color: str, alpha: float) -> str:
    if color.startswith("rgb"):
        r, g, b = (int(float(v)) for v in color[color.index("(") + 1:color.index(")")].split(",")[:3])
    else:
        h = color.lstrip("#")
        r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def phase_summary(layers: Sequence[int], cv: Mapping[str, np.ndarray], cv_random: Mapping[str, float],
                  tv: np.ndarray, n_tokens: Mapping[str, int]) -> go.Figure:
    """Per MoE layer, how concentrated the expert load is during prompt processing (prefill) and generation
    (decode): the load CV of each phase next to its uniformly-random-routing baseline (dotted, it depends on the
    phase's token count), and the total variation distance between the two phases' load shares (right axis)."""
    x = [int(l) for l in layers]
    fig = go.Figure()
    for phase, color in (("prefill", "#999999"), ("decode", "#EF553B")):
        fig.add_trace(go.Scatter(x=x, y=finite(np.round(cv[phase], 5)), mode="lines+markers", line=dict(color=color),
                                 name=f"load CV {phase} ({n_tokens[phase]} tokens)",
                                 hovertemplate=f"layer %{{x}}: CV {phase} %{{y:.3f}}<extra></extra>"))
        fig.add_trace(go.Scatter(x=x, y=[round(float(cv_random[phase]), 5)] * len(x), mode="lines",
                                 line=dict(color=color, dash="dot"), name=f"random routing, {phase}",
                                 hovertemplate=f"random CV {phase}: %{{y:.3f}}<extra></extra>"))
    fig.add_trace(go.Bar(x=x, y=finite(np.round(tv, 5)), name="TV(prefill, decode) load", yaxis="y2",
                         marker_color="rgba(99,110,250,0.35)",
                         hovertemplate="layer %{x}: total variation %{y:.3f}<extra></extra>"))
    fig.update_layout(yaxis2=dict(overlaying="y", side="right", range=[0, 1], title="total variation",
                                  showgrid=False), legend=dict(orientation="h", y=-0.3, x=0), barmode="overlay")
    fig.update_xaxes(title=axis_title("layer"), tickmode="array", tickvals=x[::max(1, len(x) // 16)])
    fig.update_layout(yaxis=dict(title="load CV (std / mean)", rangemode="tozero"))   # not yaxis2's title
    return apply(fig, title="Expert load concentration: prefill vs decode vs random routing", height=380)
