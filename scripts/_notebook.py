"""What the notebook scripts (make_notebook_05.py .. _08.py) share: their cells as a validated notebook, and an
atomic write of it."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat


def build(cells, prefix: str):
    """``cells``: [("md" | "code", source)] -> a notebook whose cell ids are ``{prefix}-00``, ``{prefix}-01``, ..."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, src) in enumerate(cells):
        cell = (nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell)(src.strip())
        cell["id"] = f"{prefix}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def write(nb, out: Path) -> None:
    """Write ``nb`` to ``out`` through a temporary file: a failed run never leaves a half-written notebook."""
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    nbformat.write(nb, tmp)
    os.replace(tmp, out)
    print(f"wrote {out}")
