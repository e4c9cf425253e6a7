# codelm: `make start` brings up the daemon, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install start stop test test-fast lint bench clean

install: $(STAMP)
	@$(BIN)/codelm-daemon models fetch default

# torch is installed first and pinned, so pip never resolves it to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

start: install
	@$(BIN)/codelm-daemon start
	@echo
	@echo "Get a suggestion:   $(BIN)/codelm-daemon complete path/to/file.py:LINE:COL"
	@echo "Connect an editor:  point it at $(abspath $(BIN))/codelm-lsp (see README, Editors)"

stop:
	@$(BIN)/codelm-daemon stop

test: install
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check daemon lsp quant tests benchmarks
	$(BIN)/ruff format --check daemon lsp quant tests benchmarks

bench: install
	$(BIN)/python benchmarks/engine.py

clean:
	rm -rf $(VENV) build *.egg-info
