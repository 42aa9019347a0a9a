import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_pip_deps_agree_with_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    pip = [l.strip()[2:] for l in lines[start + 1:] if l.strip().startswith("- ")]
    assert "-e .[dev]" in pip
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(deps)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/lab.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_core_does_not_import_views():
    import subprocess
    import sys

    code = "import sys, grokviz; print('plotly' in sys.modules or 'ipywidgets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
