#!/usr/bin/env bash
# All the set-up a fresh machine needs, idempotent: a virtualenv with every extra (torch pinned to the
# CPU wheel 2.13.0) and the Debian package with Fashion-MNIST that the data tests read.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, from the pinned CPU wheel, so no later resolution can pull a CUDA build.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[all,dev]"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "note: Fashion-MNIST tests need 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)" >&2
  fi
fi
# --- mobile demo (tests/demo, issue P7): Debian's chromium for the Playwright browser test, Node.js,
# and onnxruntime-web from mobile_demo/package-lock.json. `npm ci` runs only when the lockfile changed
# since the last install (a stamp in node_modules), so re-running this script is quick and quiet.
demo_apt=()
[ -x /usr/bin/chromium ] || demo_apt+=(chromium)
command -v node >/dev/null || demo_apt+=(nodejs)
command -v npm >/dev/null || demo_apt+=(npm)
if [ ${#demo_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${demo_apt[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${demo_apt[@]}" >/dev/null; }
  else
    echo "note: the mobile demo tests need 'sudo apt-get install ${demo_apt[*]}' (Debian/Ubuntu)" >&2
  fi
fi
if command -v npm >/dev/null && ! cmp -s mobile_demo/package-lock.json mobile_demo/node_modules/.setup-lock.json; then
  (cd mobile_demo && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null \
    && cp package-lock.json node_modules/.setup-lock.json)
fi
# --- end of the mobile demo block
echo "set-up done: $(.venv/bin/python -c 'import torch, sdk; print("torch", torch.__version__, "| retrieval-sdk", sdk.__version__)')"
