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
# The pinned mamba-ssm / causal-conv1d (pyproject's gpu extra): their sdists kept in .whl/ (scripts/gpu_check.py
# carries them to a GPU machine and builds the kernels there), their Python sources installed WITHOUT the CUDA build
# (tests/ops/test_kernel_shim.py runs them on CPU over stand-in extensions). Non-fatal: those tests then skip.
GPU_PINS=$("$VENV/bin/python" -c 'import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]))')
KSTAMP="$VENV/.kernel-sources"
if [ "$(cat "$KSTAMP" 2>/dev/null)" != "$GPU_PINS" ]; then
  NO_CUDA=(env MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE
    CAUSAL_CONV1D_FORCE_BUILD=TRUE "$VENV/bin/python" -m pip)  # FORCE: no prebuilt-wheel download attempt
  # shellcheck disable=SC2086  # GPU_PINS is a list of requirements
  if mkdir -p .whl && {
    "${NO_CUDA[@]}" download -q --no-deps --no-binary :all: --no-build-isolation -d .whl $GPU_PINS &&
      "${NO_CUDA[@]}" install -q --no-deps --no-build-isolation --no-index --find-links .whl $GPU_PINS
  } >"$VENV/kernel-sources.log" 2>&1; then
    echo "$GPU_PINS" >"$KSTAMP"
  else
    tail -5 "$VENV/kernel-sources.log" >&2
    echo "warning: could not install $GPU_PINS without CUDA; tests/ops/test_kernel_shim.py will be skipped" >&2
  fi
fi
# The embedded real dataset (Debian package, 70,000 Fashion-MNIST images, MIT).
if [ ! -d /usr/share/datasets/fashion-mnist ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    ($SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null)) ||
    echo "warning: could not apt-get install dataset-fashion-mnist; tests on the real images will be skipped" >&2
fi
