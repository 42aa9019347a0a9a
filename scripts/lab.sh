#!/usr/bin/env bash
# Start JupyterLab on notebooks/ (the bundled tiny model is the default in every notebook).
# Extra arguments go to jupyter lab, e.g. `bash scripts/lab.sh --no-browser --port 8899`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
cd notebooks
exec ../.venv/bin/jupyter lab "$@" 00_quickstart.ipynb
