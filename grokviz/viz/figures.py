"""Pure figure builders: numpy data in, ``plotly.graph_objects.Figure`` out. No JAX, no widgets.

Token axes use positions (0..seq-1) with the token strings as tick labels, so repeated tokens stay distinct.
Layer axes carry the model's real layer numbers: when routing data covers the MoE layers only (``layers``, the
layer number of each routing row, and ``num_layers``), the dense layers get a grey row of their own and a
"dense" tick. Expert axes are thinned beyond 32 ticks and hover text always names the exact ids. Every builder
sets a title that names what is shown (widgets and browser tests read it back). The load and flow builders live
in :mod:`.load_figures` and are re-exported here.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .load_figures import coactivation_conditional as coactivation_conditional
from .load_figures import coactivation_heatmap as coactivation_heatmap
from .load_figures import consecutive_rates as consecutive_rates
from .load_figures import load_bars as load_bars
from .load_figures import load_share_heatmap as load_share_heatmap
from .load_figures import routing_sankey as routing_sankey
from .scale import (
    dense_note,
    expand_layers,
    finite,
    id_ticks,
    layer_axis,
    layer_ticks,
    row_height,
    shade_dense,
    thin,
    token_ticks,
    top_experts,
)
from .scale import show_token as show_token
from .theme import PALETTE_SIZE, SEQUENTIAL, UNIFORM_COLOR, apply, axis_title, expert_color, expert_colorscale

__all__ = ["finite", "show_token"]


def _expert_heatmap(z, E: int, **kw) -> go.Heatmap:
    return go.Heatmap(z=z, colorscale=expert_colorscale(E), zmin=-0.5, zmax=E - 0.5,
                      colorbar=dict(title="expert", tickvals=thin(E, 16)), **kw)


def _layer_rows(values, rows, n):
    """Routing rows as heatmap rows over all ``n`` layers: the array itself when every layer routes (compact
    payload), otherwise nested lists with None on the dense layers' rows."""
    values = np.asarray(values)
    if list(rows) == list(range(n)):
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return finite(values)
        return values
    return expand_layers(values, rows, n).tolist()


def _cell_text_fits(n_cols: int, E: int, n_rows: int = 1, chars: int = 64) -> bool:
    """Whether expert ids printed in every cell stay legible: ``chars`` digits fit across the plot (about 7 px
    a digit: 64 in a half column, 130 in a whole one) and rows are at least 16 px."""
    return n_cols * len(str(max(E - 1, 0))) <= chars and row_height(n_rows) >= 16

# --------------------------------------------------------------------------------------------- routing --

def token_expert_strip(tokens: Sequence[str], experts: np.ndarray, gates: np.ndarray, layer: int,
                       num_experts: int) -> go.Figure:
    """The prompt's tokens coloured by their selected experts at one layer.

    experts, gates: [seq, k] (slot 0 = first choice); gates as the model applied them. Cells print the token
    while colours name experts (up to ten experts), the expert id beyond that (colours then only hint at it)."""
    experts, gates = np.asarray(experts), np.asarray(gates, np.float64)
    seq, k = experts.shape
    if num_experts <= PALETTE_SIZE:
        text = np.array([[show_token(t) for t in tokens]] * k)
    else:
        text = experts.T.astype(str) if _cell_text_fits(seq, num_experts, chars=130) else None
    hover = "token %{x}<br>slot %{y}: expert %{z}<br>gate %{customdata:.3f}<extra></extra>"
    fig = go.Figure(_expert_heatmap(experts.T, num_experts, x=np.arange(seq), y=np.arange(k), text=text,
                                    texttemplate="%{text}" if text is not None else None, customdata=gates.T,
                                    hovertemplate=hover, xgap=1, ygap=2))
    fig.update_xaxes(title=axis_title("seq"), **token_ticks(tokens))
    fig.update_yaxes(title=axis_title("k"), tickvals=list(range(k)), autorange="reversed")
    return apply(fig, title=f"Layer {layer}: tokens coloured by selected expert (row 0 = first choice)",
                 height=150 + (40 if k <= 4 else 26) * k)


def token_chips_html(tokens: Sequence[str], experts: np.ndarray, gates: np.ndarray,
                     selected: int | None = None, num_experts: int | None = None) -> str:
    """HTML chips: each token on its first-choice expert's colour, with its k experts and gates as a tooltip."""
    experts, gates = np.asarray(experts), np.asarray(gates, np.float64)
    chips = []
    for i, tok in enumerate(tokens):
        tip = ", ".join(f"E{int(e)} {g:.2f}" for e, g in zip(experts[i], gates[i]))
        border = "2px solid black" if i == selected else "1px solid transparent"
        chips.append(f'<span class="gv-token" title="{i}: {html.escape(tip)}" style="background:'
                     f'{expert_color(experts[i, 0], num_experts)};color:white;border:{border};border-radius:3px;'
                     f'padding:1px 3px;margin:1px;display:inline-block;font-family:monospace;'
                     f'text-shadow:0 0 2px black">'
                     f'{html.escape(show_token(tok))}<sub>{int(experts[i, 0])}</sub></span>')
    return '<div class="gv-token-chips" style="line-height:1.9">' + "".join(chips) + "</div>"


def routing_grid(tokens: Sequence[str], first: np.ndarray, first_gate: np.ndarray, num_experts: int,
                 selected: int | None = None, *, layers: Sequence[int] | None = None,
                 num_layers: int | None = None) -> go.Figure:
    """Token x layer grid of first-choice experts. first, first_gate: [routing layer, seq]; ``layers``: the
    layer number of each row (default 0..), ``num_layers``: the model's layers (dense ones drawn grey)."""
    first, first_gate = np.asarray(first), np.asarray(first_gate, np.float64)
    rows, n = layer_axis(layers, first.shape[0], num_layers)
    seq = first.shape[1]
    text = _layer_rows(first.astype(str), rows, n) if _cell_text_fits(seq, num_experts, n) else None
    hover = "layer %{y}, token %{x}: expert %{z}<br>gate %{customdata:.3f}<extra></extra>"
    fig = go.Figure(_expert_heatmap(_layer_rows(first, rows, n), num_experts, x=np.arange(seq), y=np.arange(n),
                                    customdata=_layer_rows(first_gate, rows, n), text=text,
                                    texttemplate="%{text}" if text is not None else None, hoverongaps=False,
                                    hovertemplate=hover, xgap=1, ygap=1 if n <= 32 else 0))
    n_dense = shade_dense(fig, rows, n)
    if selected is not None:
        fig.add_vrect(x0=selected - 0.5, x1=selected + 0.5, line=dict(color="black", width=2))
    fig.update_xaxes(title=axis_title("seq"), **token_ticks(tokens))
    fig.update_yaxes(title=axis_title("layer"), **layer_ticks(rows, n))
    return apply(fig, title=f"First-choice expert per token and layer{dense_note(n_dense)}",
                 height=max(320, 200 + row_height(n) * n))


def router_probs_by_layer(probs: np.ndarray, experts: np.ndarray, gates: np.ndarray, token: str,
                          position: int, *, layers: Sequence[int] | None = None, num_layers: int | None = None,
                          top: int | None = None) -> go.Figure:
    """One token's router probabilities at every layer. probs: [routing layer, expert]; experts, gates:
    [routing layer, k]. ``top``: show only the ``top`` experts with the highest probability at any layer
    (columns in id order; all experts when None).

    Selected experts are outlined; their gates are printed as the model applied them (Grok's are not
    renormalised, so a row's printed gates can sum to less than 1)."""
    probs, experts, gates = np.asarray(probs, np.float64), np.asarray(experts), np.asarray(gates, np.float64)
    rows, n = layer_axis(layers, probs.shape[0], num_layers)
    E = probs.shape[1]
    cols = np.sort(top_experts(probs.max(0), top))
    col_of = np.full(E, -1)
    col_of[cols] = np.arange(len(cols))
    C = len(cols)
    text = np.full((len(rows), C), "", object)
    if C <= 32:                                 # printed gates only while cells are wide enough to read
        for i in range(len(rows)):
            for e, g in zip(experts[i], gates[i]):
                if col_of[int(e)] >= 0:
                    text[i, col_of[int(e)]] = f"{g:.2f}"
    ids = np.broadcast_to(cols, (len(rows), C))
    fig = go.Figure(go.Heatmap(z=_layer_rows(np.round(probs[:, cols], 5), rows, n), x=np.arange(C), y=np.arange(n),
                               colorscale=SEQUENTIAL, zmin=0, zmax=max(float(probs.max()), 1e-6),
                               text=_layer_rows(text, rows, n) if C <= 32 else None,
                               texttemplate="%{text}" if C <= 32 else None, customdata=_layer_rows(ids, rows, n),
                               colorbar=dict(title="p"), xgap=1 if C <= 64 else 0, ygap=1 if n <= 32 else 0,
                               hoverongaps=False,
                               hovertemplate="layer %{y} expert %{customdata}: p=%{z:.4f}<extra></extra>"))
    sel_rows = np.repeat(np.asarray(rows), experts.shape[1])
    sel_cols = col_of[experts.reshape(-1).astype(int)]
    shown = sel_cols >= 0
    fig.add_trace(go.Scatter(x=sel_cols[shown], y=sel_rows[shown], mode="markers", name="selected",
                             hoverinfo="skip",
                             marker=dict(symbol="square-open", size=int(np.clip(480 / C, 4, 18)), color="white",
                                         line=dict(width=2 if C <= 32 else 1))))
    n_dense = shade_dense(fig, rows, n)
    fig.update_xaxes(title=axis_title("expert") + (f" (top {C} of {E} by p)" if C < E else ""),
                     **id_ticks(cols))
    fig.update_yaxes(title=axis_title("layer"), **layer_ticks(rows, n))
    fig.update_layout(showlegend=False, margin=dict(t=70))   # a two-line title: fits a half-column figure
    mean_sum = float(gates.sum(-1).mean())
    dense = f", {n_dense} dense layer(s) grey" if n_dense else ""
    return apply(fig, title=f"Router probabilities of token {position} {show_token(token)!r}<br>"
                            f"(gates as applied: mean sum {mean_sum:.2f}{dense})",
                 height=max(270, 140 + row_height(n) * n))


# ------------------------------------------------------------------------------------------- attention --

def attention_pattern(pattern: np.ndarray, tokens: Sequence[str], layer: int, head: int, kv_head: int) -> go.Figure:
    """[seq, kv_seq] attention probabilities with token labels on both axes."""
    pattern = np.asarray(pattern, np.float64)
    fig = go.Figure(go.Heatmap(z=pattern, x=np.arange(pattern.shape[1]), y=np.arange(pattern.shape[0]),
                               colorscale="Blues", zmin=0, zmax=1, colorbar=dict(title="p"),
                               hovertemplate="query %{y} \u2192 key %{x}: %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title=axis_title("kv_seq"), **token_ticks(tokens), tickangle=-60)
    fig.update_yaxes(title=axis_title("seq"), **token_ticks(tokens), autorange="reversed")
    side = min(700, 200 + 14 * len(tokens))
    return apply(fig, title=f"Layer {layer} head {head} (KV head {kv_head}) attention pattern", height=side)


def precap_vs_capped(logits: np.ndarray, scores: np.ndarray, cap: float, layer: int, head: int) -> go.Figure:
    """Pre-cap attention logits against the soft-capped scores cap*tanh(x/cap) (causal entries only)."""
    x, y = np.asarray(logits, np.float64).ravel(), np.asarray(scores, np.float64).ravel()
    lim = max(float(np.abs(x).max()) if x.size else 0.0, 1.0) * 1.05
    grid = np.linspace(-lim, lim, 200)
    fig = go.Figure([
        go.Scatter(x=x, y=y, mode="markers", name="scores", marker=dict(size=4, opacity=0.6, color="#636EFA")),
        go.Scatter(x=grid, y=cap * np.tanh(grid / cap), mode="lines", name=f"{cap:g}\u00b7tanh(x/{cap:g})",
                   line=dict(color=UNIFORM_COLOR, dash="dash")),
        go.Scatter(x=grid, y=grid, mode="lines", name="identity", line=dict(color="#bbb", dash="dot")),
    ])
    frac = float(np.mean(np.abs(x) > cap / 2)) if x.size else 0.0
    fig.update_xaxes(title="pre-cap logit", range=[-lim, lim])
    fig.update_yaxes(title="capped score")
    return apply(fig, title=f"Layer {layer} head {head}: pre-cap vs capped ({frac:.0%} with |x| > cap/2)",
                 height=340)


def head_summaries(summary: Mapping[str, np.ndarray], layer: int, group_size: int) -> go.Figure:
    """Per-head summaries at one layer (e.g. entropy, BOS mass, previous-token score): one bar group per
    metric, bars coloured by KV head so query heads sharing keys/values sit together."""
    fig = go.Figure()
    names = list(summary)
    H = len(np.asarray(summary[names[0]]))
    for h in range(H):
        fig.add_trace(go.Bar(x=names, y=finite([np.asarray(summary[n])[h] for n in names]),
                             name=f"h{h} (kv {h // group_size})", marker_color=expert_color(h // group_size),
                             marker_pattern_shape=["", "/", ".", "x", "-", "+"][h % group_size % 6]))
    fig.update_layout(barmode="group", legend_title_text="head")
    return apply(fig, title=f"Layer {layer} per-head summaries (colour = KV head)", height=320)


# -------------------------------------------------------------------------------------------- ablation --

def next_token_change(base: np.ndarray, new: np.ndarray, labels: Sequence[str], top: int = 10,
                      title_extra: str = "") -> go.Figure:
    """Next-token distribution before and after an intervention (the union of both top-``top`` tokens)."""
    base, new = np.asarray(base, np.float64), np.asarray(new, np.float64)
    ids = list(dict.fromkeys(np.argsort(-base)[:top].tolist() + np.argsort(-new)[:top].tolist()))
    ids.sort(key=lambda i: -base[i])
    x = [f"{show_token(labels[i])} ({i})" for i in ids]
    fig = go.Figure([go.Bar(x=x, y=base[ids], name="baseline", marker_color="#999"),
                     go.Bar(x=x, y=new[ids], name="intervened", marker_color="#EF553B")])
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="probability", rangemode="tozero")
    fig.update_xaxes(title="next token")
    return apply(fig, title=f"Next-token distribution{title_extra}", height=320)


def routing_change(base_first: np.ndarray, new_first: np.ndarray, tokens: Sequence[str], num_experts: int, *,
                   layers: Sequence[int] | None = None, num_layers: int | None = None) -> go.Figure:
    """Where the first-choice expert changed: [routing layer, seq] grid showing the new expert where it differs
    (``layers``/``num_layers`` as in :func:`routing_grid`)."""
    base_first, new_first = np.asarray(base_first), np.asarray(new_first)
    changed = base_first != new_first
    rows, n = layer_axis(layers, changed.shape[0], num_layers)
    seq = changed.shape[1]
    z = np.where(changed, new_first, None)                              # None: unchanged (no NaN in the data)
    fig = go.Figure(_expert_heatmap(expand_layers(z, rows, n).tolist(), num_experts, x=np.arange(seq),
                                    y=np.arange(n), xgap=1, ygap=1 if n <= 32 else 0, hoverongaps=False,
                                    customdata=_layer_rows(base_first, rows, n),
                                    hovertemplate="layer %{y} token %{x}: expert %{customdata} \u2192 %{z}"
                                                  "<extra></extra>"))
    n_dense = shade_dense(fig, rows, n)
    fig.update_xaxes(title=axis_title("seq"), **token_ticks(tokens))
    fig.update_yaxes(title=axis_title("layer"), **layer_ticks(rows, n))
    return apply(fig, title=f"Routing changed at {int(changed.sum())} of {changed.size} (layer, token) "
                            f"first choices{dense_note(n_dense)}", height=max(250, 120 + row_height(n) * n))
