#!/usr/bin/env bash
# Start JupyterLab on notebooks/ (the bundled tiny model is the default in every notebook).
# Extra arguments go to jupyter lab, e.g. `bash scripts/lab.sh --no-browser --port 8899`.
set -euo pipefail
cd "$(dirname "$0")/.."
# the venv, grokviz[viz,dev], and the venv's "python3" kernelspec (the notebooks' kernel) with the malloc tunables
bash scripts/setup-venv.sh
# glibc malloc tunables for the server too: XLA's big buffers are otherwise mapped and page-faulted afresh on
# every call (grokviz/runtime.py: 1x1024 forward with attention patterns 128 -> 84 ms)
source scripts/env.sh
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-root)   # jupyter refuses to run as root without it
cd notebooks
exec ../.venv/bin/jupyter lab "${extra[@]}" "$@" 00_quickstart.ipynb
