#!/usr/bin/env bash
# Run the whole test suite (installs what it needs first, including Debian's chromium for the browser test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; } \
    || echo "warning: could not install chromium; tests/test_browser.py will be skipped" >&2
fi
source scripts/env.sh  # the malloc tunables the notebook kernels run with (grokviz/runtime.py)
# two workers, each taking whole files (module fixtures compile once): most of the suite is single-threaded XLA
# compilation, so on 2 cores this halves the wall time; `bash scripts/test.sh -n 0` runs in one process
exec .venv/bin/python -m pytest -n "${GROKVIZ_TEST_WORKERS:-2}" --dist loadfile "$@"
