#!/usr/bin/env bash
# Start JupyterLab on notebooks/ (the bundled tiny model is the default in every notebook).
# Extra arguments go to jupyter lab, e.g. `bash scripts/lab.sh --no-browser --port 8899`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
# glibc malloc otherwise returns XLA's large buffers to the OS and page-faults them back on every call
# (bench/README.md: -17 % on a 1x1024 forward). Only the JupyterLab process tree sees these settings.
export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-100000000000}
export MALLOC_TOP_PAD_=${MALLOC_TOP_PAD_:-268435456}
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-root)   # jupyter refuses to run as root without it
cd notebooks
exec ../.venv/bin/jupyter lab "${extra[@]}" "$@" 00_quickstart.ipynb
