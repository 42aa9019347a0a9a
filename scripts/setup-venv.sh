#!/usr/bin/env bash
# Create (or reuse) ./.venv and install grokviz with its dev extras. Idempotent; sourced by lab.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.grokviz-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -U pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
