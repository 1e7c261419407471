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
echo "set-up done: $(.venv/bin/python -c 'import torch, sdk; print("torch", torch.__version__, "| retrieval-sdk", sdk.__version__)')"
