"""export_html: a figure or a whole view as one standalone, offline HTML file."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
from plotly.basedatatypes import BaseFigure

from ..checkpoint.fsutil import write_file_atomic


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
    return write_file_atomic(path, doc.encode("utf-8"))
