#!/usr/bin/env bash
# Start JupyterLab on notebooks/ (the bundled tiny model is the default in every notebook).
# Extra arguments go to jupyter lab, e.g. `bash scripts/lab.sh --no-browser --port 8899`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
# Transparent huge pages for malloc: XLA's big buffers are otherwise page-faulted 4 KiB at a time on every
# call (grokviz/runtime.py: 1x1024 forward with attention patterns 127 -> 83 ms). Kernels inherit it.
source scripts/env.sh
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-root)   # jupyter refuses to run as root without it
cd notebooks
exec ../.venv/bin/jupyter lab "${extra[@]}" "$@" 00_quickstart.ipynb
