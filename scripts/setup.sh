#!/usr/bin/env bash
# All the set-up a fresh machine needs, idempotent and quiet: the Debian packages the tests, the export and
# the demo need; a virtualenv with every extra at the tested versions (scripts/constraints.txt; torch is
# the 2.13.0 CPU wheel); the demo's npm packages; then `retrieval-sdk doctor`, whose exit code it returns.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG=${SETUP_LOG:-${TMPDIR:-/tmp}/retrieval-sdk-setup.$(id -u).log}
: >"$LOG"

# --- system packages (Debian/Ubuntu), each for a reason:
#   libusb-1.0-0           tflite-support's native library links it (TFLite metadata writer, ImageEmbedder)
#   dataset-fashion-mnist  the real labelled image set that data tests and Fashion-MNIST configs read
#   gcompris-qt-data, mate-backgrounds, lomiri-wallpapers-16.04
#                          ~255 real photographs (animals, monuments, tools, nature) that the quickstart fits
#                          its phone model on (training/photos.py); data only, no dependencies, 107 MB
#   chromium               the Playwright tests (mobile demo, evaluate's report.html) drive it (Playwright's
#                          own browser download needs the internet)
#   nodejs, npm            the demo's JS preprocessing test and `npm ci` of onnxruntime-web (only when no
#                          node / npm is on PATH: a NodeSource nodejs ships npm and conflicts with Debian's)
#   python3-venv           only when "$PYTHON" cannot create a virtualenv (Debian splits venv out)
apt_missing=()
want_deb() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || apt_missing+=("$1"); }
apt_install() {  # install "$@" as root, or through passwordless sudo; retry once after `apt-get update`
  local sudo=()
  [ $# -gt 0 ] || return 0
  if ! command -v apt-get >/dev/null; then
    echo "note: no apt-get here: install the equivalents of: $*" >&2; return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=(sudo -n); else
      echo "note: not root and no passwordless sudo: run  sudo apt-get install $*" >&2; return 0
    fi
  fi
  echo "system packages: installing $*"
  export DEBIAN_FRONTEND=noninteractive
  if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >>"$LOG" 2>&1; then
    "${sudo[@]}" apt-get update -qq >>"$LOG" 2>&1 || true
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >>"$LOG" 2>&1 || {
      echo "error: apt-get install $* failed (log: $LOG):" >&2; tail -n 15 "$LOG" >&2; exit 1; }
  fi
}
if command -v dpkg-query >/dev/null; then
  for pkg in libusb-1.0-0 dataset-fashion-mnist chromium gcompris-qt-data mate-backgrounds lomiri-wallpapers-16.04; do
    want_deb "$pkg"
  done
  command -v node >/dev/null || apt_missing+=(nodejs)
  command -v npm >/dev/null || apt_missing+=(npm)
  "$PYTHON" -m venv --help >/dev/null 2>&1 && "$PYTHON" -c "import ensurepip" 2>/dev/null || apt_missing+=(python3-venv)
fi
apt_install "${apt_missing[@]}"

# --- the virtualenv: torch first, from the pinned CPU wheel, so no later resolution can pull a CUDA build;
# then the project with every extra, at the tested versions.
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -qq --disable-pip-version-check -c scripts/constraints.txt)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[all,dev]"

# --- mobile demo: onnxruntime-web from mobile_demo/package-lock.json. `npm ci` runs only when the lockfile
# changed since the last install (a stamp in node_modules), so re-running this script is quick.
if command -v npm >/dev/null && ! cmp -s mobile_demo/package-lock.json mobile_demo/node_modules/.setup-lock.json; then
  (cd mobile_demo && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >>"$LOG" 2>&1 \
    && cp package-lock.json node_modules/.setup-lock.json) || { echo "error: npm ci failed (log: $LOG)" >&2; exit 1; }
fi

echo "set-up done: $(.venv/bin/python -c 'import torch, sdk; print("torch", torch.__version__, "| retrieval-sdk", sdk.__version__)')"
# Every part checked, with the exact fix for what is missing; non-zero when an installed extra lacks a part.
.venv/bin/retrieval-sdk doctor
