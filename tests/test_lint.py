"""ruff (configured in pyproject.toml: [tool.ruff]) is clean over the package, scripts, tests, benches and notebooks."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("notebooks/*.ipynb"))


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    ruff = str(ruff) if ruff.exists() else shutil.which("ruff")
    assert ruff, "ruff is not installed: it comes with the dev extra (pip install -e '.[viz,dev]')"
    assert len(NOTEBOOKS) >= 6, NOTEBOOKS
    paths = ["grokviz", "scripts", "tests", "bench", *NOTEBOOKS]
    out = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", *paths], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
