"""Pure figure builders of the generation explorer: numpy data in, ``plotly.graph_objects.Figure`` out.

A token index ``i`` counts the row's real prompt tokens first (``0 .. n_prompt - 1``), then the generated ones
(generated token ``t`` is index ``n_prompt + t``). An expert id of -1 means "not routed yet" (a token that has
arrived from the stream before the routing captured with it): such cells are drawn without colour. Each
builder keeps one trace structure whatever the data, so a FigureWidget shows it updated in place. No JAX, no
widgets.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from .scale import (
    dense_note,
    expand_layers,
    finite,
    id_ticks,
    layer_axis,
    layer_ticks,
    row_height,
    shade_dense,
    show_token,
    thin,
    top_experts,
)
from .theme import SEQUENTIAL, UNIFORM_COLOR, apply, axis_title, expert_color, expert_colorscale

PENDING_TEXT = "#888888"   # a streamed token whose routing has not arrived yet
CELL_CHARS = 7             # token text shown in a cell of the token strip (hover has the whole piece)


def _rgb(color: str) -> tuple[int, int, int]:
    if color.startswith("#"):
        return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
    r, g, b = (int(float(v)) for v in re.findall(r"[\d.]+", color)[:3])
    return r, g, b


def text_color(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (relative luminance of its sRGB value)."""
    r, g, b = _rgb(background)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"


def _expert_heatmap(z, E: int, **kw) -> go.Heatmap:
    return go.Heatmap(z=z, colorscale=expert_colorscale(E), zmin=-0.5, zmax=E - 0.5,
                      colorbar=dict(title="expert", tickvals=thin(E, 16)), **kw)


def _short(tok: str, n: int = CELL_CHARS) -> str:
    s = show_token(tok)
    return s if len(s) <= n else s[:n - 1] + "\u2026"


def per_line(width: int) -> int:
    """Tokens per line of the token strip at ``width`` px (about 64 px a cell, 8 to 24 a line)."""
    return int(np.clip((int(width) - 120) // 64, 8, 24))


def token_strip(tokens: Sequence[str], first: np.ndarray, gates: np.ndarray, n_prompt: int, layer: int,
                num_experts: int, *, selected: int | None = None, total: int | None = None,
                cols: int = 16) -> go.Figure:
    """The prompt and the continuation as text wrapped over lines of ``cols`` tokens, each cell coloured by the
    token's first-choice expert at ``layer``. first: int [n_tok] (-1: not routed yet); gates: [n_tok] its gate.
    ``total``: the tokens there will be (prompt + max new tokens), so the strip keeps its size while it fills.
    The continuation is outlined; ``selected`` is boxed."""
    first, gates = np.asarray(first, np.int64), np.asarray(gates, np.float64)
    n = len(tokens)
    total = max(int(total or n), n, 1)
    lines = -(-total // cols)
    z = np.full((lines, cols), None, object)
    hover = np.full((lines, cols), "", object)
    idx = np.arange(n)
    ys, xs = idx // cols, idx % cols
    routed = first >= 0
    z[ys[routed], xs[routed]] = first[routed]
    for i in range(n):
        where = f"prompt token {i}" if i < n_prompt else f"generated token {i - n_prompt} (index {i})"
        route = (f"expert {first[i]} (gate {gates[i]:.3f})" if first[i] >= 0 else "routing not in yet")
        hover[ys[i], xs[i]] = f"{where}: {html.escape(show_token(tokens[i]))}<br>layer {layer}: {route}"
    colors = [text_color(expert_color(e, num_experts)) if e >= 0 else PENDING_TEXT for e in first]
    fig = go.Figure([
        _expert_heatmap(z.tolist(), num_experts, x=np.arange(cols), y=np.arange(lines), hovertext=hover.tolist(),
                        hovertemplate="%{hovertext}<extra></extra>", xgap=2, ygap=2),
        go.Scatter(x=xs, y=ys, mode="text", text=[html.escape(_short(t)) for t in tokens], hoverinfo="skip",
                   textfont=dict(color=colors, family="DejaVu Sans Mono, monospace", size=11), showlegend=False),
    ])
    if n > n_prompt:   # outline the continuation: one box per line it covers
        for y in range(n_prompt // cols, (n - 1) // cols + 1):
            x0 = n_prompt % cols if y == n_prompt // cols else 0
            x1 = (n - 1) % cols if y == (n - 1) // cols else cols - 1
            fig.add_shape(type="rect", x0=x0 - 0.5, x1=x1 + 0.5, y0=y - 0.5, y1=y + 0.5,
                          line=dict(color="#222", width=1, dash="dot"))
    if selected is not None and 0 <= selected < n:
        fig.add_shape(type="rect", x0=xs[selected] - 0.5, x1=xs[selected] + 0.5, y0=ys[selected] - 0.5,
                      y1=ys[selected] + 0.5, line=dict(color="black", width=3))
    fig.update_xaxes(visible=False, range=[-0.5, cols - 0.5])
    fig.update_yaxes(visible=False, range=[lines - 0.5, -0.5])
    gen = max(n - n_prompt, 0)
    return apply(fig, title=f"Layer {layer}: prompt ({min(n, n_prompt)} tokens) and continuation ({gen} of "
                            f"{max(total - n_prompt, 0)}, dotted) coloured by first-choice expert",
                 height=110 + 30 * lines)


def routing_timeline(first: np.ndarray, gates: np.ndarray, tokens: Sequence[str], num_experts: int, *,
                     steps: int, layers: Sequence[int] | None = None, num_layers: int | None = None,
                     selected: int | None = None, layer: int | None = None) -> go.Figure:
    """Layers x generated steps of first-choice experts, growing as tokens arrive. first, gates: [routing
    layer, arrived] (-1: routing not in yet); ``tokens``: the arrived tokens (tick labels); ``steps``: the
    x extent (max new tokens), fixed so the grid fills from the left. Dense layers are grey rows;
    ``selected`` (a step) is outlined, ``layer`` (the strip's layer) marked on the axis."""
    first, gates = np.asarray(first, np.int64), np.asarray(gates, np.float64)
    rows, n = layer_axis(layers, first.shape[0], num_layers)
    arrived = first.shape[1]
    steps = max(int(steps), arrived, 1)
    z = np.full((len(rows), steps), None, object)
    g = np.full((len(rows), steps), None, object)
    done = first >= 0
    z[:, :arrived] = np.where(done, first, None)
    g[:, :arrived] = np.where(done, np.round(gates, 4), None)
    digits = len(str(max(num_experts - 1, 0)))
    show_ids = steps * digits <= 64 and row_height(n) >= 16
    text = expand_layers(np.where(z == None, "", z).astype(str), rows, n).tolist() if show_ids else None  # noqa: E711
    fig = go.Figure(_expert_heatmap(expand_layers(z, rows, n).tolist(), num_experts, x=np.arange(steps),
                                    y=np.arange(n), customdata=expand_layers(g, rows, n).tolist(), text=text,
                                    texttemplate="%{text}" if show_ids else None, hoverongaps=False,
                                    hovertemplate="layer %{y}, step %{x}: expert %{z}<br>gate %{customdata}"
                                                  "<extra></extra>", xgap=1, ygap=1 if n <= 32 else 0))
    n_dense = shade_dense(fig, rows, n)
    if selected is not None and 0 <= selected < steps:
        fig.add_vrect(x0=selected - 0.5, x1=selected + 0.5, line=dict(color="black", width=2))
    if layer is not None and layer in rows:
        fig.add_hrect(y0=layer - 0.5, y1=layer + 0.5, line=dict(color="black", width=1, dash="dot"))
    idx = thin(arrived, 32)
    fig.update_xaxes(title="generated token", range=[-0.5, steps - 0.5], tickmode="array", tickvals=idx,
                     ticktext=[show_token(tokens[i]) for i in idx], tickangle=-60)
    fig.update_yaxes(title=axis_title("layer"), **layer_ticks(rows, n))
    return apply(fig, title=f"Routing while generating: step {arrived} of {steps}{dense_note(n_dense)}",
                 height=max(300, 180 + row_height(n) * n))


def attention_row(att: np.ndarray, key_tokens: Sequence[str], n_prompt: int, position: int, token: str,
                  head: int | None) -> go.Figure:
    """Token ``position``'s attention over the tokens before it, at every layer. att: [layer, key] (one head, or
    the mean over heads when ``head`` is None); keys are token indices 0..position."""
    att = np.asarray(att, np.float64)
    L, K = att.shape
    fig = go.Figure(go.Heatmap(z=np.round(att, 4), x=np.arange(K), y=np.arange(L), colorscale="Blues", zmin=0,
                               zmax=max(float(att.max()) if att.size else 0.0, 1e-6), colorbar=dict(title="p"),
                               hovertemplate="layer %{y} \u2192 key %{x}: %{z:.3f}<extra></extra>",
                               ygap=1 if L <= 32 else 0))
    if 0 < n_prompt < K:
        fig.add_vline(x=n_prompt - 0.5, line=dict(color="#222", width=1, dash="dot"))
    idx = thin(K, 32)
    fig.update_xaxes(title="key token (dotted: continuation starts)", tickmode="array", tickvals=idx,
                     ticktext=[show_token(key_tokens[i]) for i in idx], tickangle=-60)
    fig.update_yaxes(title=axis_title("layer"), tickmode="array", tickvals=thin(L), ticktext=[str(l) for l in thin(L)])
    who = "mean over heads" if head is None else f"head {head}"
    return apply(fig, title=f"Attention of token {position} {show_token(token)!r} ({who})",
                 height=max(270, 150 + row_height(L) * L))


def load_vs_random(prefill: np.ndarray, decode: np.ndarray, k: int, layer: int, *, n_prefill: int,
                   n_decode: int, top: int | None = None) -> go.Figure:
    """At one layer, the fraction of prompt tokens (prefill) and of generated tokens (decode) sent to each
    expert, next to random routing's k/E. ``top``: the ``top`` experts busiest in either (columns in id order)."""
    prefill, decode = np.asarray(prefill, np.float64), np.asarray(decode, np.float64)
    E = prefill.shape[0]
    cols = np.sort(top_experts(np.maximum(prefill, decode), top))
    x = np.arange(len(cols))
    base = k / E
    tv = 0.5 * float(np.abs(prefill / k - decode / k).sum()) if n_prefill and n_decode else 0.0
    hover = "expert %{customdata}: %{y:.3f} of the tokens<extra>%{fullData.name}</extra>"
    fig = go.Figure([
        go.Bar(x=x, y=np.round(prefill[cols], 5), name=f"prefill ({n_prefill} tokens)", marker_color="#999",
               customdata=cols, hovertemplate=hover),
        go.Bar(x=x, y=np.round(decode[cols], 5), name=f"decode ({n_decode} tokens)", marker_color="#EF553B",
               customdata=cols, hovertemplate=hover),
        go.Scatter(x=[-0.5, len(cols) - 0.5], y=[base, base], mode="lines", name=f"random k/E = {base:.3f}",
                   line=dict(color=UNIFORM_COLOR, dash="dash"), hoverinfo="name"),
    ])
    fig.update_layout(barmode="group", bargap=0.15, legend=dict(orientation="h", y=-0.28))
    fig.update_xaxes(title=axis_title("expert") + (f" (top {len(cols)} of {E})" if len(cols) < E else ""),
                     **id_ticks(cols))
    fig.update_yaxes(title="fraction of tokens", rangemode="tozero")
    return apply(fig, title=f"Layer {layer} expert load: prefill vs decode<br>(total variation {tv:.3f})",
                 height=360)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where token lists ``a`` and ``b`` differ (one ending early counts), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def continuations(base: Sequence[str], base_logp: np.ndarray, new: Sequence[str] | None, new_logp,
                  diverge: int | None, *, steps: int, what: str = "", pending: bool = False) -> go.Figure:
    """Two continuations token by token (rows: baseline, intervened), cells coloured by the model's
    log-probability of the token it chose, the first divergence marked. ``new=None``: nothing to compare yet;
    ``pending``: the second row is still streaming in (its tokens shown, log-probabilities not yet)."""
    steps = max(int(steps), len(base), len(new or ()), 1)
    z = np.full((2, steps), None, object)
    text = np.full((2, steps), "", object)
    for r, (toks, lp) in enumerate([(base, base_logp), (new, new_logp)]):
        if toks is None:
            continue
        lp = np.asarray(lp, np.float64)
        if not (pending and r == 1):
            z[r, :len(toks)] = np.round(lp[:len(toks)], 4)
        text[r, :len(toks)] = [html.escape(_short(t, 6)) for t in toks]
    rows = ["baseline", "removed" if what else "(none)"]
    vals = np.array([[np.nan if v is None else v for v in r] for r in z], np.float64)
    low = float(np.nanmin(vals)) if np.isfinite(vals).any() else 0.0
    fig = go.Figure(go.Heatmap(z=finite(vals), x=np.arange(steps), y=rows, text=text.tolist(),
                               texttemplate="%{text}" if steps <= 48 else None, colorscale=SEQUENTIAL,
                               zmin=min(-8.0, low), zmax=0, colorbar=dict(title="log p"), xgap=1, ygap=3,
                               hoverongaps=False,
                               hovertemplate="%{y}, step %{x}: %{text}<br>log p %{z:.3f}<extra></extra>"))
    if diverge is not None:
        fig.add_vline(x=diverge - 0.5, line=dict(color="#EF553B", width=3))
    fig.update_xaxes(title="generated token", range=[-0.5, steps - 0.5], tickvals=thin(steps, 32))
    fig.update_yaxes(autorange="reversed")
    if pending:
        title = f"Regenerating with {what} removed: {len(new)} of {steps} tokens"
    elif new is None:
        title = "Continuations: remove experts below to regenerate and compare"
    elif diverge is None:
        title = f"Continuations with {what} removed: identical"
    else:
        title = f"Continuations with {what} removed: diverge at generated token {diverge}"
    return apply(fig, title=title, height=200)
