# Two commands do all set-up (see README, Quick start):
#   make demo   creates .venv, installs ContrastiveSeg with its test tools, runs the demo on the CPU
#   make test   creates .venv if needed and runs the whole test suite
# On this project's CPU machines torch==2.13.0 comes as a CPU build from local disk; on a CUDA
# machine override it, e.g.  make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo demo-quick test test-fast lint bench clean

$(BIN)/contrastiveseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first (or together with monai): alone, monai would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test]"
	@touch $@

demo: $(BIN)/contrastiveseg
	$(BIN)/contrastiveseg demo

demo-quick: $(BIN)/contrastiveseg
	$(BIN)/contrastiveseg demo --quick

test: $(BIN)/contrastiveseg
	$(BIN)/python -m pytest -ra --durations=15

test-fast: $(BIN)/contrastiveseg
	$(BIN)/python -m pytest -m "not slow"

lint: $(BIN)/contrastiveseg
	$(BIN)/ruff check ContrastiveSegLib ContrastiveSeg Testing benchmarks

bench: $(BIN)/contrastiveseg
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
