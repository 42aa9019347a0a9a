"""Pure figure builders: numpy data in, ``plotly.graph_objects.Figure`` out. No JAX, no widgets.

Token axes use positions (0..seq-1) with the token strings as tick labels, so repeated tokens stay distinct.
Every builder sets a title that names what is shown (widgets and browser tests read it back).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .theme import DIVERGING, SEQUENTIAL, UNIFORM_COLOR, apply, axis_title, expert_color, expert_colorscale


def _ticks(labels: Sequence[str], max_ticks: int = 64) -> dict:
    n = len(labels)
    step = max(1, int(np.ceil(n / max_ticks)))
    idx = list(range(0, n, step))
    return dict(tickmode="array", tickvals=idx, ticktext=[show_token(labels[i]) for i in idx])


def finite(a) -> list:
    """``a`` as nested lists with None where it is NaN or infinite: plotly draws a gap there, and the figure stays
    strict JSON (a widget message with NaN is refused by Jupyter's serializer)."""
    a = np.asarray(a, np.float64)
    return np.where(np.isfinite(a), a, None).tolist()


def _expert_ticks(E: int, max_ticks: int = 32) -> list[int]:
    """Expert tick positions: every expert up to ``max_ticks`` experts, then every n-th (64-128 expert models)."""
    return list(range(0, E, max(1, int(np.ceil(E / max_ticks)))))


def show_token(tok: str) -> str:
    """A printable form of a token piece (SentencePiece's word marker becomes a visible space)."""
    return str(tok).replace("\u2581", "\u2423").replace("\n", "\u21b5") or "\u2205"


def _expert_heatmap(z, E: int, **kw) -> go.Heatmap:
    return go.Heatmap(z=z, colorscale=expert_colorscale(E), zmin=-0.5, zmax=E - 0.5,
                      colorbar=dict(title="expert", tickvals=_expert_ticks(E, 16)), **kw)


# --------------------------------------------------------------------------------------------- routing --

def token_expert_strip(tokens: Sequence[str], experts: np.ndarray, gates: np.ndarray, layer: int,
                       num_experts: int) -> go.Figure:
    """The prompt's tokens coloured by their selected experts at one layer.

    experts, gates: [seq, k] (slot 0 = first choice); gates are Grok's un-renormalised router probabilities.
    """
    experts, gates = np.asarray(experts), np.asarray(gates, np.float64)
    seq, k = experts.shape
    text = np.array([[show_token(t) for t in tokens]] * k)
    hover = "token %{x} %{text}<br>slot %{y}: expert %{z}<br>gate %{customdata:.3f}<extra></extra>"
    fig = go.Figure(_expert_heatmap(experts.T, num_experts, x=np.arange(seq), y=np.arange(k), text=text,
                                    texttemplate="%{text}", customdata=gates.T, hovertemplate=hover,
                                    xgap=1, ygap=2))
    fig.update_xaxes(title=axis_title("seq"), **_ticks(tokens))
    fig.update_yaxes(title=axis_title("k"), tickvals=list(range(k)), autorange="reversed")
    return apply(fig, title=f"Layer {layer}: tokens coloured by selected expert (row 0 = first choice)",
                 height=150 + 40 * k)


def token_chips_html(tokens: Sequence[str], experts: np.ndarray, gates: np.ndarray,
                     selected: int | None = None) -> str:
    """HTML chips: each token on its first-choice expert's colour, with its k experts and gates as a tooltip."""
    experts, gates = np.asarray(experts), np.asarray(gates, np.float64)
    chips = []
    for i, tok in enumerate(tokens):
        tip = ", ".join(f"E{int(e)} {g:.2f}" for e, g in zip(experts[i], gates[i]))
        border = "2px solid black" if i == selected else "1px solid transparent"
        chips.append(f'<span class="gv-token" title="{i}: {html.escape(tip)}" style="background:'
                     f'{expert_color(experts[i, 0])};color:white;border:{border};border-radius:3px;'
                     f'padding:1px 3px;margin:1px;display:inline-block;font-family:monospace">'
                     f'{html.escape(show_token(tok))}<sub>{int(experts[i, 0])}</sub></span>')
    return '<div class="gv-token-chips" style="line-height:1.9">' + "".join(chips) + "</div>"


def routing_grid(tokens: Sequence[str], first: np.ndarray, first_gate: np.ndarray, num_experts: int,
                 selected: int | None = None) -> go.Figure:
    """Token x layer grid of first-choice experts. first, first_gate: [layer, seq]."""
    first, first_gate = np.asarray(first), np.asarray(first_gate, np.float64)
    L, seq = first.shape
    hover = "layer %{y}, token %{x}: expert %{z}<br>gate %{customdata:.3f}<extra></extra>"
    fig = go.Figure(_expert_heatmap(first, num_experts, x=np.arange(seq), y=np.arange(L), customdata=first_gate,
                                    text=first.astype(str), texttemplate="%{text}" if seq <= 64 else None,
                                    hovertemplate=hover, xgap=1, ygap=1))
    if selected is not None:
        fig.add_vrect(x0=selected - 0.5, x1=selected + 0.5, line=dict(color="black", width=2))
    fig.update_xaxes(title=axis_title("seq"), **_ticks(tokens))
    fig.update_yaxes(title=axis_title("layer"))
    return apply(fig, title="First-choice expert per token and layer", height=max(320, 200 + 22 * L))


def router_probs_by_layer(probs: np.ndarray, experts: np.ndarray, gates: np.ndarray, token: str,
                          position: int) -> go.Figure:
    """One token's router probabilities at every layer. probs: [layer, expert]; experts, gates: [layer, k].

    Selected experts are outlined; their gates are printed as they are used (not renormalised), so a row's
    printed gates sum to less than 1."""
    probs, experts, gates = np.asarray(probs, np.float64), np.asarray(experts), np.asarray(gates, np.float64)
    L, E = probs.shape
    text = np.full((L, E), "", object)
    for l in range(L if E <= 32 else 0):       # printed gates only while cells are wide enough to read
        for e, g in zip(experts[l], gates[l]):
            text[l, int(e)] = f"{g:.2f}"
    fig = go.Figure(go.Heatmap(z=probs, x=np.arange(E), y=np.arange(L), colorscale=SEQUENTIAL, zmin=0,
                               zmax=max(float(probs.max()), 1e-6), text=text, texttemplate="%{text}",
                               colorbar=dict(title="p"), xgap=1, ygap=1,
                               hovertemplate="layer %{y} expert %{x}: p=%{z:.3f}<extra></extra>"))
    ls, es = np.repeat(np.arange(L), experts.shape[1]), experts.reshape(-1)
    fig.add_trace(go.Scatter(x=es, y=ls, mode="markers", name="selected (gate = p)", hoverinfo="skip",
                             marker=dict(symbol="square-open", size=int(np.clip(480 / E, 5, 18)), color="white",
                                         line=dict(width=2 if E <= 32 else 1))))
    fig.update_xaxes(title=axis_title("expert"), tickvals=_expert_ticks(E))
    fig.update_yaxes(title=axis_title("layer"))
    fig.update_layout(showlegend=False, margin=dict(t=70))   # a two-line title: fits a half-column figure
    mean_sum = float(gates.sum(-1).mean())
    return apply(fig, title=f"Router probabilities of token {position} {show_token(token)!r}<br>"
                            f"(gates un-renormalised, mean sum {mean_sum:.2f})", height=max(270, 140 + 22 * L))


# ------------------------------------------------------------------------------------------------ load --

def load_share_heatmap(share: np.ndarray, title: str = "Expert load share per layer") -> go.Figure:
    """layers x experts heatmap of the share of routed slots; diverging around the uniform share 1/E."""
    share = np.asarray(share, np.float64)
    L, E = share.shape
    u = 1.0 / E
    span = max(float(np.abs(share - u).max()), 1e-6)
    fig = go.Figure(go.Heatmap(z=share, x=np.arange(E), y=np.arange(L), colorscale=DIVERGING, zmid=u,
                               zmin=u - span, zmax=u + span, text=np.round(share, 2),
                               texttemplate="%{text}" if L * E <= 512 else None, xgap=1, ygap=1,
                               colorbar=dict(title="share"),
                               hovertemplate="layer %{y} expert %{x}: %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title=axis_title("expert"), tickvals=_expert_ticks(E))
    fig.update_yaxes(title=axis_title("layer"))
    return apply(fig, title=f"{title} (uniform = {u:.3f})", height=max(250, 120 + 22 * L))


def load_bars(share: np.ndarray, layer: int) -> go.Figure:
    """One layer's load share per expert, with the uniform share 1/E marked."""
    share = np.asarray(share, np.float64)
    E = share.shape[0]
    fig = go.Figure(go.Bar(x=np.arange(E), y=share, marker_color=[expert_color(e) for e in range(E)],
                           hovertemplate="expert %{x}: %{y:.3f}<extra></extra>", name="share"))
    fig.add_hline(y=1.0 / E, line=dict(color=UNIFORM_COLOR, dash="dash"), annotation_text="uniform 1/E",
                  annotation_position="top right")
    fig.update_xaxes(title=axis_title("expert"), tickvals=_expert_ticks(E))
    fig.update_yaxes(title="share of routed slots", rangemode="tozero")
    return apply(fig, title=f"Layer {layer} expert load share", height=300)


def coactivation_conditional(co: np.ndarray) -> np.ndarray:
    """P(j selected | i selected) = C[i, j] / C[i, i] from co-activation counts (diagonal = load); NaN on the
    diagonal and for unused experts."""
    co = np.asarray(co, np.float64)
    diag = np.diag(co).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = np.where(diag[:, None] > 0, co / np.where(diag > 0, diag, 1)[:, None], np.nan)
    np.fill_diagonal(cond, np.nan)
    return cond


def coactivation_heatmap(co: np.ndarray, layer: int, k: int | None = None) -> go.Figure:
    """Expert co-activation as P(expert j also selected | expert i selected), from [expert, expert] counts whose
    diagonal is each expert's load (grokviz.analysis.routing.coactivation). Uniform random top-k routing gives
    (k - 1) / (E - 1) everywhere off the diagonal."""
    cond = coactivation_conditional(co)
    E = cond.shape[0]
    text = np.where(np.isnan(cond), "", np.char.mod("%.2f", np.nan_to_num(cond))) if E <= 16 else None
    fig = go.Figure(go.Heatmap(z=finite(cond), x=np.arange(E), y=np.arange(E), colorscale=SEQUENTIAL,
                               xgap=1 if E <= 32 else 0, ygap=1 if E <= 32 else 0, text=text,
                               texttemplate="%{text}" if text is not None else None, zmin=0, zmax=1,
                               hovertemplate="P(expert %{x} | expert %{y}) = %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title="also selected: expert j", tickvals=_expert_ticks(E))
    fig.update_yaxes(title="selected: expert i", tickvals=_expert_ticks(E), autorange="reversed")
    base = f" (random: {(k - 1) / (E - 1):.3f})" if k else ""
    return apply(fig, title=f"Layer {layer} co-activation P(j | i){base}", height=340)


def consecutive_rates(layers: np.ndarray, first_repeat: np.ndarray, topk_overlap: np.ndarray,
                      baselines: Mapping[str, float]) -> go.Figure:
    """How often consecutive tokens share their first choice / top-k experts, per layer, against the rate
    expected under random (uniform, independent) routing."""
    fig = go.Figure()
    for key, values, color in (("first_repeat", first_repeat, "#636EFA"), ("topk_overlap", topk_overlap, "#EF553B")):
        fig.add_trace(go.Scatter(x=np.asarray(layers), y=finite(values), mode="lines+markers",
                                 name=key.replace("_", " "), line=dict(color=color)))
        if key in baselines:
            fig.add_hline(y=float(baselines[key]), line=dict(color=color, dash="dot"),
                          annotation_text=f"random {key.replace('_', ' ')}", annotation_position="top left")
    fig.update_xaxes(title=axis_title("layer"))
    fig.update_yaxes(title="rate over consecutive token pairs", rangemode="tozero")
    fig.update_layout(legend=dict(orientation="h", y=-0.25, x=0))
    return apply(fig, title="Consecutive-token routing vs random baseline", height=340)


def routing_sankey(flows: Sequence[np.ndarray], first_layer: int = 0, min_count: float = 0) -> go.Figure:
    """Sankey of first-choice expert paths: flows[i] is [E, E] counts from layer first_layer+i to the next."""
    flows = [np.asarray(f, np.float64) for f in flows]
    E = flows[0].shape[0]
    n_layers = len(flows) + 1
    labels = [f"L{first_layer + i} E{e}" for i in range(n_layers) for e in range(E)]
    colors = [expert_color(e) for _ in range(n_layers) for e in range(E)]
    src, dst, val = [], [], []
    for i, f in enumerate(flows):
        a, b = np.nonzero(f > min_count)
        src += (i * E + a).tolist()
        dst += ((i + 1) * E + b).tolist()
        val += f[a, b].tolist()
    lcol = [_rgba(expert_color(int(s) % E), 0.35) for s in src]
    fig = go.Figure(go.Sankey(arrangement="fixed", node=dict(label=labels, color=colors, pad=8, thickness=12),
                              link=dict(source=src, target=dst, value=val, color=lcol)))
    last = first_layer + n_layers - 1
    return apply(fig, title=f"First-choice routing flow, layers {first_layer}\u2013{last}", height=420)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


# ------------------------------------------------------------------------------------------- attention --

def attention_pattern(pattern: np.ndarray, tokens: Sequence[str], layer: int, head: int, kv_head: int) -> go.Figure:
    """[seq, kv_seq] attention probabilities with token labels on both axes."""
    pattern = np.asarray(pattern, np.float64)
    fig = go.Figure(go.Heatmap(z=pattern, x=np.arange(pattern.shape[1]), y=np.arange(pattern.shape[0]),
                               colorscale="Blues", zmin=0, zmax=1, colorbar=dict(title="p"),
                               hovertemplate="query %{y} \u2192 key %{x}: %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title=axis_title("kv_seq"), **_ticks(tokens), tickangle=-60)
    fig.update_yaxes(title=axis_title("seq"), **_ticks(tokens), autorange="reversed")
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


def routing_change(base_first: np.ndarray, new_first: np.ndarray, tokens: Sequence[str], num_experts: int) -> go.Figure:
    """Where the first-choice expert changed: [layer, seq] grid showing the new expert where it differs."""
    base_first, new_first = np.asarray(base_first), np.asarray(new_first)
    changed = base_first != new_first
    L, seq = changed.shape
    z = np.where(changed, new_first, None).tolist()                    # None: unchanged (no NaN in the data)
    fig = go.Figure(_expert_heatmap(z, num_experts, x=np.arange(seq), y=np.arange(L), xgap=1, ygap=1,
                                    customdata=base_first,
                                    hovertemplate="layer %{y} token %{x}: %{customdata} \u2192 %{z}<extra></extra>"))
    fig.update_xaxes(title=axis_title("seq"), **_ticks(tokens))
    fig.update_yaxes(title=axis_title("layer"))
    return apply(fig, title=f"Routing changed at {int(changed.sum())} of {changed.size} (layer, token) "
                            f"first choices", height=max(250, 120 + 22 * L))
