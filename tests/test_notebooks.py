"""Every notebook executes top to bottom (nbclient), and is committed with outputs stripped."""

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, startup_timeout=120, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("script,notebook", [("make_notebook_05.py", "05_grok1_at_scale.ipynb"),
                                             ("make_notebook_06.py", "06_generation.ipynb"),
                                             ("make_notebook_07.py", "07_other_moe_families.ipynb"),
                                             ("make_notebook_08.py", "08_expert_analysis.ipynb")])
def test_generated_notebook_is_what_its_script_writes(script, notebook):
    """notebooks 05 to 08 are written by their scripts in scripts/: the two never drift apart."""
    path = NB_DIR.parent / "scripts" / script
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    built = mod.build()
    stored = nbformat.read(NB_DIR / notebook, as_version=4)
    assert [(c.cell_type, c.id, c.source) for c in stored.cells] == [(c.cell_type, c.id, c.source) for c in built.cells]
