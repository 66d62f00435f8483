# Two commands on a fresh machine: `make run` (a short real comparison) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtopt-installed
# torch first, pinned to the CPU wheel this machine carries, so that the `torch>=2.3` range of
# pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: run test test-kernels lint docs gpu-check study-cl-rr study-qm9 study-tables venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The headline at smoke scale (quick preset: 20,000 images, 4 epochs, one seed; a few minutes on
# 2 cores): unitary scalarization against a loss-based method (FAMO), two gradient-based ones
# (CAGrad, MGDA-UB) and a hand-set fixed weighting. The real answer, at a budget where it holds,
# is the study in docs/results/mnist_cl_rr/.
RUN_METHODS ?= unitary:reduction=mean,famo,cagrad,mgda_ub,fixed:weights=0.25/0.75
run: $(STAMP)
	$(VENV)/bin/mtopt data fetch mnist
	$(VENV)/bin/mtopt compare --problem multi_mnist/cl_rr --preset quick --methods "$(RUN_METHODS)"
	@echo "The full study (50,000 images, 3 seeds, confidence intervals): docs/results/mnist_cl_rr/README.md"

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

# The documentation site (Sphinx): method pages, API and CLI reference generated from the code
# (docs/_ext/mtopt_docs.py). Every warning is an error; -E re-reads every page so none is missed.
DOCS_OUT ?= docs/_build/html
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -E -W --keep-going -q -b html docs $(DOCS_OUT)
	@echo "docs: $(DOCS_OUT)/index.html"

# Style and types: ruff's rules (pyproject.toml) on everything, mypy on the library (src/mtopt)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts docs/conf.py docs/_ext
	$(VENV)/bin/ruff format --check src tests scripts docs/conf.py docs/_ext
	$(VENV)/bin/mypy

# The GPU checks (device tests on CUDA, a Multi-MNIST epoch, `mtopt bench --device cuda`, the
# data-parallel test), under 5 minutes on one GPU; results in gpu_check/ (docs/benchmarks.md)
gpu-check: $(STAMP)
	OUT=gpu_check scripts/gpu_check.sh

# The reproduction studies (docs/results/*/README.md): hours to days on one core each
# (--workers 1 --threads 1 leaves the other core free). Each resumes from the run store committed
# beside it: nothing stored is trained again, a run cut short resumes from its last epoch.
STUDY_RUN ?= $(VENV)/bin/mtopt sweep --workers 1 --threads 1
CL_RR := docs/results/mnist_cl_rr
QM9 := docs/results/qm9_mlp
study-cl-rr: $(STAMP)
	$(VENV)/bin/mtopt data fetch mnist
	for stage in first selected optimizers grid; do \
		$(STUDY_RUN) $(CL_RR)/$$stage.toml --db $(CL_RR)/mnist_cl_rr.sqlite || exit 1; \
	done
study-qm9: $(STAMP)
	$(VENV)/bin/mtopt data fetch qm9
	$(STUDY_RUN) $(QM9)/curves/qm9_mlp_curves_400.toml --db $(QM9)/qm9_mlp.sqlite
	$(STUDY_RUN) $(QM9)/study.toml --db $(QM9)/qm9_mlp.sqlite

# The studies' tables from what their stores hold now (trains nothing): report/ beside each study.
# A study whose single-task references are not all stored yet says so in one line and is skipped.
STUDY_TMP ?= runs/study_tables
study-tables: $(STAMP)
	for stage in selected:report optimizers:report_optimizers grid:report_grid; do \
		name=$${stage%%:*}; out=$(CL_RR)/$${stage#*:}; \
		$(VENV)/bin/mtopt sweep $(CL_RR)/$$name.toml --db $(CL_RR)/mnist_cl_rr.sqlite --stored \
			--quiet --run-dir $(STUDY_TMP) && \
		$(VENV)/bin/mtopt report $(STUDY_TMP)/sweeps/$$name.json --baseline unitary \
			--paper gama_grassi_2025 --out-dir $$out && \
		cp $(STUDY_TMP)/sweeps/$$name.json $$out/$$name.json || exit 1; \
	done
	-$(VENV)/bin/mtopt sweep $(QM9)/study.toml --db $(QM9)/qm9_mlp.sqlite --stored --quiet \
		--run-dir $(STUDY_TMP) && \
	$(VENV)/bin/mtopt report $(STUDY_TMP)/sweeps/study.json --baseline unitary \
		--paper $(QM9)/published_gnn.toml --out-dir $(QM9)/report && \
	cp $(STUDY_TMP)/sweeps/study.json $(QM9)/report/study.json

clean:
	rm -rf $(VENV) runs docs/_build docs/methods docs/api docs/cli
