#!/usr/bin/env bash
# Run the whole test suite (installs what it needs first, including Debian's chromium for the browser test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
# Debian packages the tests use when missing: chromium (the browser test) and g++ (grokviz.kernels, the optional
# fused attention kernel; without a compiler grokviz falls back to pure JAX and tests/test_fused_attention.py skips)
need=()
[ -x /usr/bin/chromium ] || need+=(chromium fonts-dejavu-core)
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; } \
    || echo "warning: could not install ${need[*]}; the tests that need them will be skipped" >&2
fi
source scripts/env.sh  # the malloc tunables the notebook kernels run with (grokviz/runtime.py)
# two workers, each taking whole files (module fixtures compile once): most of the suite is single-threaded XLA
# compilation, so on 2 cores this halves the wall time; `bash scripts/test.sh -n 0` runs in one process
exec .venv/bin/python -m pytest -n "${GROKVIZ_TEST_WORKERS:-2}" --dist loadfile "$@"
