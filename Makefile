# Two commands on a fresh machine: `make run` (a short real comparison) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtopt-installed
# torch first, pinned to the CPU wheel this machine carries, so that the `torch>=2.3` range of
# pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: run test test-kernels lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mtopt data fetch mnist
	$(VENV)/bin/mtopt compare --problem multi_mnist/cl_rr --preset quick

test: $(STAMP)
	$(PY) -m pytest -q

# The numerical core again under other OpenBLAS kernels than the one numpy picks for this CPU:
# results change in the last bits, and no test may depend on them.
KERNELS ?= Haswell Prescott
test-kernels: $(STAMP)
	for k in $(KERNELS); do \
		echo "OPENBLAS_CORETYPE=$$k"; \
		OPENBLAS_CORETYPE=$$k $(PY) -m pytest -q -p no:cacheprovider \
			tests/core tests/methods tests/engine tests/test_stress.py || exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) runs
