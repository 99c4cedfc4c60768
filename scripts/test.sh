#!/usr/bin/env bash
# The test command (`make test`, `.ci/run`): CPU suite, everything but GPU-marked tests.
# pytest exit code 5 ("no tests collected") is a failure here, like any other non-zero code.
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
.venv/bin/python -m pytest -m "not gpu" -q --durations=15 "$@"
rc=$?
[ $rc -eq 5 ] && echo "pytest collected no tests: failing" >&2
exit $rc
