# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install, start an embedded local server, run the main job
#   make test   - create .venv, install, lint, type-check and run the whole test suite
#
# torch is pinned to a CPU build; for CUDA: make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX=...
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-cookbook venv lint typecheck bench serve clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[server,dev,demo,wandb]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/loops-async demo

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Opt-in: drive real tinker-cookbook 0.6.1 components through loops_async.tinker. Its full
# dependency set does not install (tml-renderers>=0.4.1 is not on PyPI), so it is installed
# without dependencies plus the few its completers, RL and supervised modules import.
test-cookbook: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps "tinker-cookbook==0.6.1"
	$(BIN)/python -m pip install --quiet chz blobfile datasets termcolor pillow
	$(BIN)/python -m pytest -q tests/tinker/test_cookbook.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/roundtrip.py

serve: $(STAMP)
	$(BIN)/loops-async serve

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-output
