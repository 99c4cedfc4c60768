# One line per target. `make demo` and `make test` are the README's two commands.
PY := .venv/bin/python
export RAY_AUTH_MODE ?= disabled

install:
	bash scripts/install.sh
demo: install
	$(PY) jobs/demo.py $(DEMO_ARGS)
test: install
	bash scripts/test.sh
lint: install
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
test-gpu: install
	$(PY) -m pytest -m gpu -q
bench: install
	$(PY) benchmarks/scan.py && $(PY) benchmarks/data.py && $(PY) benchmarks/train_step.py
gpu-check:  # on a GPU machine, no venv or network needed (carry .whl/): build kernels, parity tests, CUDA benchmarks
	$$([ -x $(PY) ] && echo $(PY) || echo python3) scripts/gpu_check.py $(GPU_CHECK_ARGS)

.PHONY: install demo test lint test-gpu bench gpu-check
