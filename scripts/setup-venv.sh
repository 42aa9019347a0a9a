#!/usr/bin/env bash
# Create (or reuse) ./.venv, install grokviz with its viz and dev extras, and give the venv's Jupyter kernel
# ("python3", the one the notebooks name) grokviz's malloc settings (grokviz/runtime.py). Idempotent; run by
# scripts/lab.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.grokviz-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -U pip
  .venv/bin/python -m pip install -q -e ".[viz,dev]"
  touch "$stamp"
fi
# stdlib only, run as a file: rewrites .venv/share/jupyter/kernels/python3/kernel.json only when it differs
.venv/bin/python grokviz/runtime.py kernelspec .venv >/dev/null
