#!/usr/bin/env bash
# Create .venv and install arm-platform with its test extra; idempotent (a stamp tracks pyproject.toml).
# torch/torchvision go first with pinned versions: pip takes them from local disk where they lie there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$STAMP"
fi
# The embedded real dataset (Debian package, 70,000 Fashion-MNIST images, MIT).
if [ ! -d /usr/share/datasets/fashion-mnist ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    ($SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null)) ||
    echo "warning: could not apt-get install dataset-fashion-mnist; tests on the real images will be skipped" >&2
fi
