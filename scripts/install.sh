#!/usr/bin/env bash
# Install arm-platform; idempotent (stamps track pyproject.toml and the pins). One list of pins, two targets:
#
#   scripts/install.sh          local set-up / CI: .venv + the test extra, the kernels' Python sources (no CUDA
#                               build), the embedded dataset
#   scripts/install.sh --image  the cluster image (docker/Dockerfile): into $PYTHON itself (default `python`: the Ray
#                               image's, which runs `ray start`, Ray workers and job entrypoints), torch from
#                               $TORCH_INDEX_URL, the same kernel sources, then the kernels COMPILED once for
#                               $TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") by scripts/gpu_build.py, then the package
#                               with its tune extra (Optuna).
#       --no-package            stop before the package (the Dockerfile's cacheable kernel layer)
#       --dry-run               print the commands instead of running them (tests/test_docker.py)
#
# torch/torchvision go first with pinned versions: pip takes them from local disk where they lie there.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
MODE=local PACKAGE=1 DRY=0
for arg in "$@"; do
  case "$arg" in
    --image) MODE=image ;;
    --no-package) PACKAGE=0 ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: $0 [--image [--no-package] [--dry-run]]" >&2 && exit 2 ;;
  esac
done
[ "$MODE" = image ] || [ "$PACKAGE$DRY" = 10 ] || { echo "--no-package / --dry-run go with --image" >&2 && exit 2; }
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }

# The pinned mamba-ssm / causal-conv1d (pyproject's gpu extra): their sdists kept in .whl/ (scripts/gpu_check.py
# carries them to a GPU machine and builds the kernels there), their Python sources installed WITHOUT the CUDA build
# (tests/ops/test_kernel_shim.py runs them on CPU over stand-in extensions; the image adds the compiled extensions).
gpu_pins() {
  "$1" -c 'import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]))'
}
install_kernel_sources() {  # PYTHON STATE_DIR FATAL
  local py=$1 state=$2 fatal=$3 pins kstamp
  pins=$(gpu_pins "$py")
  kstamp="$state/.kernel-sources"
  [ "$(cat "$kstamp" 2>/dev/null)" != "$pins" ] || return 0
  local no_cuda=(env MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE
    CAUSAL_CONV1D_FORCE_BUILD=TRUE "$py" -m pip)  # FORCE: no prebuilt-wheel download attempt
  if [ "$DRY" = 1 ]; then
    echo "+ ${no_cuda[*]} download -q --no-deps --no-binary :all: --no-build-isolation -d .whl $pins"
    echo "+ ${no_cuda[*]} install -q --no-deps --no-build-isolation --no-index --find-links .whl $pins"
    return 0
  fi
  # shellcheck disable=SC2086  # pins is a list of requirements
  if mkdir -p .whl "$state" && {
    "${no_cuda[@]}" download -q --no-deps --no-binary :all: --no-build-isolation -d .whl $pins &&
      "${no_cuda[@]}" install -q --no-deps --no-build-isolation --no-index --find-links .whl $pins
  } >"$state/kernel-sources.log" 2>&1; then
    echo "$pins" >"$kstamp"
  else
    tail -5 "$state/kernel-sources.log" >&2
    [ "$fatal" = 0 ] || { echo "error: could not install $pins" >&2 && exit 1; }
    echo "warning: could not install $pins without CUDA; tests/ops/test_kernel_shim.py will be skipped" >&2
  fi
}

if [ "$MODE" = image ]; then
  PY=${PYTHON:-python}
  STATE=${ARM_STATE_DIR:-$HOME/.arm-platform}
  ARCHS=${TORCH_CUDA_ARCH_LIST:?"--image needs TORCH_CUDA_ARCH_LIST, e.g. '8.0;9.0' (docker/Dockerfile sets it)"}
  [ -n "${MAX_JOBS:-}" ] || unset MAX_JOBS  # an empty MAX_JOBS would break gpu_build.py's default (= cores)
  INDEX=()
  [ -z "${TORCH_INDEX_URL:-}" ] || INDEX=(--index-url "$TORCH_INDEX_URL")
  run "$PY" -m pip install -q --no-cache-dir "${INDEX[@]}" "${TORCH_PINS[@]}"
  run "$PY" -m pip install -q --no-cache-dir ninja packaging setuptools wheel  # cpp_extension + the sdists' setup.py
  install_kernel_sources "$PY" "$STATE" 1
  # The extensions: one fat binary per extension holding sm_XY code for every arch of the list. gpu_build.py emits
  # -gencode for --arch (the first); nvcc appends the others from NVCC_APPEND_FLAGS (nvcc reads it itself).
  IFS='; ' read -r -a ARCH_LIST <<<"$ARCHS"
  EXTRA=""
  for arch in "${ARCH_LIST[@]:1}"; do EXTRA+=" -gencode=arch=compute_${arch//./},code=sm_${arch//./}"; done
  WANT="$(gpu_pins "$PY") ${TORCH_PINS[*]} arch=$ARCHS"
  if [ "$(cat "$STATE/.kernels-built" 2>/dev/null)" != "$WANT" ]; then
    WORK=${ARM_BUILD_DIR:-/tmp/arm-gpu-build}
    SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
    run env NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-}$EXTRA" \
      "$PY" scripts/gpu_build.py --sdists .whl --work "$WORK" --arch "${ARCH_LIST[0]}"
    run cp -L "$WORK/ext/selective_scan_cuda.so" "$WORK/ext/causal_conv1d_cuda.so" "$SITE/"
    run "$PY" -c 'import torch, selective_scan_cuda, causal_conv1d_cuda, causal_conv1d, mamba_ssm.ops.selective_scan_interface'
    run rm -rf "$WORK"
    [ "$DRY" = 1 ] || { mkdir -p "$STATE" && echo "$WANT" >"$STATE/.kernels-built"; }
  fi
  [ "$PACKAGE" = 0 ] || run "$PY" -m pip install -q --no-cache-dir ".[tune]"  # tune: --optuna sweeps
  exit 0
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${TORCH_PINS[@]}"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$STAMP"
fi
install_kernel_sources "$VENV/bin/python" "$VENV" 0  # non-fatal here: the shim tests then skip
# The embedded real dataset (Debian package, 70,000 Fashion-MNIST images, MIT).
if [ ! -d /usr/share/datasets/fashion-mnist ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    ($SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null)) ||
    echo "warning: could not apt-get install dataset-fashion-mnist; tests on the real images will be skipped" >&2
fi
