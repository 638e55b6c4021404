# Two commands a newcomer needs: `make demo` and `make test` (both install what they need).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. On this project's machines `torch==2.13.0` resolves to a CPU wheel on
# disk; elsewhere use e.g. TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'.
TORCH ?= torch==2.13.0
DEMO_SWEEP ?= sweeps/demo
DEMO_REPORT ?= reports/demo
# local: blocks until the grid is done (the slurm launcher returns at once with job ids).
DEMO_LAUNCHER ?= local

.PHONY: install install-dev demo test test-fast lint clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## CPU demo: corpus → demo grid (local executor) → analysis report with heatmaps and a fit.
## A run that fails is listed in the report; rerunning `make demo` retries only what is missing.
demo: install
	@rc=0; WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m steplaw_train.sweep +grid=demo \
	    launcher=$(DEMO_LAUNCHER) sweep_dir=$(DEMO_SWEEP) || rc=$$?; \
	$(BIN)/python -m analysis report $(DEMO_SWEEP) --out $(DEMO_REPORT) || exit $$?; \
	echo "Demo report: $(DEMO_REPORT) (summary.json, heatmaps/, plots/, runs.csv)"; \
	if [ $$rc -ne 0 ]; then echo "Some runs failed: $(BIN)/python -m steplaw_train.sweep.status $(DEMO_SWEEP)"; fi; \
	exit $$rc

## Lint + the whole test suite (the SLURM tier runs when a cluster is up: see .ci/slurm-up.sh).
test: install-dev lint
	WANDB_MODE=offline $(BIN)/python -m pytest

test-fast: install-dev
	WANDB_MODE=offline $(BIN)/python -m pytest -m "not slurm and not slow"

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-demo:
	rm -rf $(DEMO_SWEEP) $(DEMO_REPORT)
