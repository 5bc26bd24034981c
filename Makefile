# Two set-up commands: `make run` starts the service on the embedded default, `make test` runs the tests.
# Each creates .venv on first use. The CPU build of PyTorch is installed first so that pip does not pull CUDA.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/trickserve: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) || $(BIN)/pip install -q $(TORCH) --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: install run test test-fast lint bench clean
install: $(BIN)/trickserve

run: install
	$(BIN)/trickserve up

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

lint: install
	$(BIN)/ruff check core api worker cli tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/engine_overhead.py
	$(BIN)/python bench/augment.py

clean:
	rm -rf $(VENV) .trickserve runs .pytest_cache
