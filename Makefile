# cehrx: `make help` lists the targets.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
DEMO_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install lint format test test-fast demo bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: ## install cehrx with dev extras (torch $(TORCH_VERSION) only if torch is not importable)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -e ".[dev]"

LINT_PATHS ?= cehrx tests experiments

lint: ## ruff: lint and check formatting (a second or two; `make test` runs it first)
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)

format: ## ruff: fix what lint can fix and reformat
	$(PYTHON) -m ruff check --fix $(LINT_PATHS)
	$(PYTHON) -m ruff format $(LINT_PATHS)

test: install lint ## lint, then the whole test suite (what CI runs)
	$(PYTHON) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: ## unit tests only, no install step
	$(PYTHON) -m pytest -m "not slow" tests/unit $(PYTEST_ARGS)

demo: install ## the whole pipeline on the embedded Eunomia data, tiny model, CPU (< 15 min; re-run skips finished stages)
	$(PYTHON) -m cehrx experiment=demo $(DEMO_ARGS)

bench: ## run the benchmarks in experiments/bench (see RESULTS.md there)
	$(PYTHON) experiments/bench/bench_prepare.py
	$(PYTHON) experiments/bench/bench_train_throughput.py
	$(PYTHON) experiments/bench/bench_generate.py --threads 1
	$(PYTHON) experiments/bench/bench_zeroshot.py

clean: ## remove demo runs and caches
	rm -rf runs .pytest_cache
