import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_pip_deps_agree_with_pyproject():
    project = PYPROJECT["project"]
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    pip = [line.strip()[2:] for line in lines[start + 1:] if line.strip().startswith("- ")]
    assert "-e .[viz,dev]" in pip
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(
        project["dependencies"] + project["optional-dependencies"]["viz"])


def test_extras():
    """jax as published (a GPU is the cuda extra), the widgets' stack in viz, ruff in dev; the scripts install
    the extras the notebooks and the tests need."""
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    core = {_name(d) for d in project["dependencies"]}
    assert not any("[" in d for d in project["dependencies"] if d.startswith("jax"))  # no jax[cpu]
    assert {"plotly", "ipywidgets", "jupyterlab"} <= {_name(d) for d in extras["viz"]} and not core & {
        "plotly", "ipywidgets", "jupyterlab", "anywidget"}
    assert any(d.startswith("jax[cuda") for d in extras["cuda"]) and "ruff" in {_name(d) for d in extras["dev"]}
    assert '-e ".[viz,dev]"' in (ROOT / "scripts" / "setup-venv.sh").read_text()
    assert ".[viz,cuda]" in (ROOT / "README.md").read_text()


def test_declared_dependencies_are_imported():
    """Every core and viz dependency is imported somewhere in the package or the notebooks (jaxlib and
    ml_dtypes through their own names; jupyterlab is the server scripts/lab.sh starts; anywidget is what plotly's
    FigureWidget is built on, and a clean install without it fails every widget, see the test below)."""
    project = PYPROJECT["project"]
    sources = "\n".join(p.read_text() for p in [*ROOT.glob("grokviz/**/*.py"), *ROOT.glob("notebooks/*.ipynb")])
    for dep in project["dependencies"] + project["optional-dependencies"]["viz"]:
        name = _name(dep)
        if name in ("jaxlib", "jupyterlab", "anywidget"):
            continue
        module = name.replace("-", "_")
        assert re.search(rf"^\s*(import|from) {module}\b|\"(import|from) {module}\b", sources, re.M), name


def test_the_viz_extra_is_enough_for_a_figure_widget():
    """plotly's FigureWidget needs anywidget, which nothing imports by name: it must be in the viz extra (a clean
    install without it failed every widget and notebook)."""
    import plotly.graph_objects as go

    assert "anywidget" in {_name(d) for d in PYPROJECT["project"]["optional-dependencies"]["viz"]}
    fig = go.FigureWidget(go.Figure(go.Scatter(x=[0, 1], y=[1, 0])))
    assert len(fig.data) == 1


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/lab.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_core_does_not_import_views():
    code = "import sys, grokviz; print('plotly' in sys.modules or 'ipywidgets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
