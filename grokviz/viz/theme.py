"""Plotly template, the expert colour map and axis-label helpers (labels come from ``grokviz.axes``)."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import sample_colorscale

from ..axes import label

TEMPLATE_NAME = "grokviz"

# Ten well-separated colours (plotly's "Plotly" qualitative palette, reordered so experts 0-7 of an
# 8-expert model are maximally distinct). Models with more experts than that get a continuous scale over the
# expert ids instead (a cycled palette would give experts 3, 13, 23, ... one colour); hover text names the id.
EXPERT_PALETTE = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880",
                  "#FF97FF", "#FECB52")
PALETTE_SIZE = len(EXPERT_PALETTE)
UNIFORM_COLOR = "#444444"
DIVERGING = "RdBu_r"
SEQUENTIAL = "Viridis"
MANY_EXPERTS = "Turbo"     # expert colours when there are more experts than palette entries

TEMPLATE = go.layout.Template(
    layout=go.Layout(
        font=dict(family="DejaVu Sans, Arial, sans-serif", size=12),
        margin=dict(l=60, r=20, t=50, b=50),
        paper_bgcolor="white",
        plot_bgcolor="white",
        xaxis=dict(showgrid=False, zeroline=False, linecolor="#999", ticks="outside", automargin=True,
                   title_standoff=8),
        yaxis=dict(showgrid=True, gridcolor="#eee", zeroline=False, linecolor="#999", ticks="outside"),
        colorway=list(EXPERT_PALETTE),
        hoverlabel=dict(namelength=-1),
        title=dict(x=0.02, xanchor="left", font=dict(size=14)),
    )
)
pio.templates[TEMPLATE_NAME] = TEMPLATE


def expert_color(expert: int, num_experts: int | None = None) -> str:
    """The colour of expert ``expert`` (stable across every figure of a model with ``num_experts`` experts:
    the palette up to its length, a continuous scale over the ids beyond)."""
    e = int(expert)
    if num_experts is None or int(num_experts) <= len(EXPERT_PALETTE):
        return EXPERT_PALETTE[e % len(EXPERT_PALETTE)]
    return sample_colorscale(MANY_EXPERTS, [(e + 0.5) / int(num_experts)])[0]


def expert_colorscale(num_experts: int) -> list:
    """A colorscale mapping integer z in [0, num_experts - 1] to the expert colours (use with
    ``zmin=-0.5, zmax=num_experts - 0.5``): stepped for up to ten experts, continuous beyond."""
    n = max(int(num_experts), 1)
    if n > len(EXPERT_PALETTE):
        return MANY_EXPERTS
    scale = []
    for e in range(n):
        c = expert_color(e)
        scale += [[e / n, c], [(e + 1) / n, c]]
    return scale


def axis_title(axis: str) -> str:
    """Axis title for an axis word of ``grokviz.axes`` (``"kv_seq"`` -> ``"key position"``)."""
    return label(axis)


def apply(fig: go.Figure, *, title: str | None = None, height: int | None = None,
          width: int | None = None) -> go.Figure:
    """Apply the grokviz template (and optional title/size) to ``fig`` in place; returns it."""
    fig.update_layout(template=TEMPLATE_NAME)
    if title is not None:
        fig.update_layout(title_text=title)
    if height is not None:
        fig.update_layout(height=height)
    if width is not None:
        fig.update_layout(width=width)
    return fig
