"""What every grokviz view shares: getting a Run with the right captures, FigureWidgets that carry their data,
range checks with clear errors, and a view base class whose controls redraw exactly once per change.

Front-end safety: a FigureWidget's *state* (``_widget_data`` / ``_widget_layout``) is what a view in the browser is
first drawn from; the Python -> JS edit messages (restyle, relayout, add traces) only reach a front end whose
plotly module has already loaded, and a message that arrives earlier is dropped. So every FigureWidget is built
with its traces in the constructor, is changed only in place (same traces, one ``batch_update``), and has its
state refreshed after each change: whenever the browser gets round to drawing it, it draws the current figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
from copy import deepcopy

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from ..api import Run

ROUTING_CAPTURE = ("blocks.moe.router_probs", "blocks.moe.top_k_experts", "blocks.moe.top_k_weights")
ATTENTION_CAPTURE = ("blocks.attn.pattern", "blocks.attn.scores", "blocks.attn.logits")
COLUMN_WIDTH = 1040   # px: a JupyterLab notebook column at 1500 px with the file browser open; views fit in it
GAP = 16              # px between side-by-side figures


def get_run(source, prompt=None, capture=()) -> Run:
    """A Run holding ``capture``. ``source`` is a Model (run on ``prompt``) or a Run: returned as is when it
    already holds ``capture`` and no new prompt is given, otherwise re-run with *all* its settings
    (interventions, attention spec, top_k, expert implementation, bucketing) and the union of the captures."""
    if isinstance(source, Run):
        need = frozenset(capture)
        if prompt is None and need <= source.capture:
            return source
        settings = {**source.settings(), "capture": sorted(source.capture | need)}
        if prompt is None:
            return source.rerun(**settings)
        if settings.get("interventions") is not None and settings["interventions"].patches:
            raise ValueError("this Run has activation patches, which are tied to its own tokens: pass the Run "
                             "without a new prompt, or run the model on the new prompt yourself")
        return source.model.run(prompt, **settings)
    if prompt is None:
        raise ValueError("give a prompt (text or token ids [batch, seq]) to run the model on")
    return source.run(prompt, capture=list(capture))


def check_index(name: str, value, n: int, what: str) -> int:
    """``value`` as an int in [0, n); otherwise a ValueError naming the argument, the range and ``what`` counts."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer in [0, {n}), got {value!r}")
    if not 0 <= int(value) < n:
        raise ValueError(f"{name}={int(value)} is outside [0, {n}): {what}")
    return int(value)


def shown(widget, when) -> list:
    """``[widget]`` when ``when`` holds, else ``[]``: a control with nothing to choose is left out of its row
    (kept as an attribute, so code and tests can still read it). Hiding it with ``Layout(display="none")``
    instead left the view's plots undrawn in JupyterLab (the browser test)."""
    return [widget] if when else []


def routing_layers(run: Run, name: str = "blocks.moe.top_k_experts") -> tuple[list[int], int]:
    """(the layer number of each row of routing capture ``name``, the model's layer count). Routing hooks come
    from the MoE layers only; the cache says which (``layers_of``), else every layer routes."""
    n_rows = run.cache.shape(name)[int(run.cache.variants)]
    kept = run.cache.layers_of(name)
    if kept is None:
        kept = getattr(run.cache, "moe_layers", None)
    if kept is None and getattr(run.cfg, "moe_layers", None) is not None:
        kept = run.cfg.moe_layers
    rows = list(range(n_rows)) if kept is None else [int(l) for l in kept]
    L = int(run.cfg.num_layers)
    if len(rows) != n_rows or any(not 0 <= l < L for l in rows):
        raise ValueError(f"{name} has {n_rows} layer row(s) but the cache names layers {rows} of a "
                         f"{L}-layer model")
    return rows, L


def moe_layer_slider(cls: str, rows: list[int], value: int, width: int = 420):
    """A slider over the MoE layers' real numbers (dense layers have no routing to show): an IntSlider when
    every layer routes, a SelectionSlider over the MoE layer numbers otherwise. ``.value`` is the layer number."""
    if rows == list(range(len(rows))):
        return slider(cls, "layer", 0, len(rows) - 1, value, width)
    s = W.SelectionSlider(options=[(str(l), l) for l in rows], value=value, description="layer",
                          continuous_update=False, layout=W.Layout(width=f"{width}px"))
    s.add_class(cls)
    return s


def check_moe_layer(name: str, value, rows: list[int], num_layers: int) -> int:
    """``value`` as a MoE layer number; a ValueError naming the argument, the layers and the dense ones."""
    layer = check_index(name, value, num_layers, f"the model has {num_layers} layers")
    if layer not in rows:
        raise ValueError(f"{name}={layer} is a dense MLP layer (no routing); the MoE layers are "
                         f"{rows if len(rows) <= 12 else rows[:6] + ['...'] + rows[-3:]}")
    return layer


def real_positions(run: Run, row: int) -> np.ndarray:
    """int [n]: the real (non-pad) positions of ``row`` (left or right padding alike); ValueError when the row
    is outside the batch or has no real token."""
    b = run.tokens.shape[0]
    row = check_index("row", row, b, f"the batch has {b} row(s)")
    pos = run.positions(row)
    if not len(pos):
        raise ValueError(f"row {row} has no real (non-pad) token")
    return pos


def figure_widget(fig: go.Figure, width: int) -> go.FigureWidget:
    """A FigureWidget holding ``fig`` (traces and layout in its constructor state), ``width`` px wide."""
    fw = go.FigureWidget(fig)
    fw.layout.width = int(width)
    _refresh_state(fw)
    return fw


def _refresh_state(fw: go.FigureWidget) -> None:
    # what a front end draws a new view from (plotly's own display hook does the same for a top-level figure)
    fw._widget_data = deepcopy(fw._data)
    fw._widget_layout = deepcopy(fw._layout_obj._props)


def sync(fw: go.FigureWidget, fig: go.Figure) -> None:
    """Make FigureWidget ``fw`` show ``fig`` (same trace types: each view keeps its traces fixed): data and
    layout in place in one batched message, then the widget state refreshed. ``fw``'s width is kept."""
    if len(fw.data) != len(fig.data) or any(a.type != b.type for a, b in zip(fw.data, fig.data)):
        raise ValueError(f"figure changed its traces ({[t.type for t in fw.data]} -> {[t.type for t in fig.data]}); "
                         "a view's figures keep one trace structure so they can be updated in place")
    layout = fig.layout.to_plotly_json()
    layout.pop("width", None)
    with fw.batch_update():
        for old, new in zip(fw.data, fig.data):
            old.update(new.to_plotly_json(), overwrite=True)
        fw.layout.update(layout, overwrite=True)
    _refresh_state(fw)


def slider(cls: str, description: str, lo: int, hi: int, value: int, width: int = 420) -> W.IntSlider:
    s = W.IntSlider(value=value, min=lo, max=max(hi, lo), description=description, continuous_update=False,
                    layout=W.Layout(width=f"{width}px"))
    s.add_class(cls)
    return s


def flex_row(children, width: int | None = None) -> W.HBox:
    """Side-by-side children that wrap onto the next line rather than overflow a narrower column."""
    return W.HBox(children, layout=W.Layout(flex_flow="row wrap", align_items="flex-start",
                                            justify_content="space-between", width="100%",
                                            max_width=f"{width}px" if width else None))


def split(width: int, *fractions: float) -> list[int]:
    """Widths of side-by-side figures sharing ``width`` px (gaps taken off) in the given proportions."""
    free = width - GAP * (len(fractions) - 1) - 8
    total = sum(fractions)
    return [int(free * f / total) for f in fractions]


class View(W.VBox):
    """Base of the views. ``figures`` lists the FigureWidgets (display order, for export_html); ``state`` is a
    dataclass of the selection. Controls only update ``state`` and name the parts to redraw (:meth:`_changed`);
    inside :meth:`hold` those parts are collected and drawn once when the outermost hold ends."""

    figures: list
    html_parts: list = []
    state: object

    def _init_view(self) -> None:
        self._held, self._dirty = 0, set()

    def _changed(self, *parts: str) -> None:
        self._dirty.update(parts)
        if not self._held and self._dirty:
            parts, self._dirty = frozenset(self._dirty), set()
            self._draw(parts)

    def _draw(self, parts: frozenset) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def hold(self):
        """Change many controls at once (``with view.hold(): ...``): one redraw (or model run) at the end."""
        self._held += 1
        try:
            yield self
        finally:
            self._held -= 1
            if not self._held:
                self._changed()

    def _finish(self, children, css_class: str, width: int) -> None:
        super().__init__(children, layout=W.Layout(width="100%", max_width=f"{width}px"))
        self.add_class(css_class)

    def _export_parts(self) -> list:
        return [("html", h.value) for h in self.html_parts] + [("fig", f) for f in self.figures]

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.state).items()
                           if not isinstance(v, (list, tuple, set, frozenset)) or len(v) <= 8)
        return f"{type(self).__name__}({fields})"
