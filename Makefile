# codelm: `make start` brings up the daemon, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install start stop test lint bench bench-peers clean

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

# llama.cpp's llama-server, the peer the benchmarks compare against, built from the sources
# vendored in llama-cpp-python's sdist (10-40 minutes on 2 cores; never part of `make test`).
PEERS := .peers
LLAMA_CPP_PY := 0.3.36
bench-peers: $(PEERS)/bin/llama-server

$(PEERS)/bin/llama-server:
	mkdir -p $(PEERS)/src
	$(PYTHON) -m pip download --no-deps --no-binary :all: -d $(PEERS)/src llama-cpp-python==$(LLAMA_CPP_PY)
	tar xzf $(PEERS)/src/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C $(PEERS)/src
	cmake -S $(PEERS)/src/llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp -B $(PEERS)/build \
		-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON
	cmake --build $(PEERS)/build --target llama-server -j$$(nproc)
	mkdir -p $(PEERS)/bin
	cp $(PEERS)/build/bin/llama-server $(PEERS)/bin/

clean:
	rm -rf $(VENV) build *.egg-info
