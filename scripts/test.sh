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
exec .venv/bin/python -m pytest "$@"
