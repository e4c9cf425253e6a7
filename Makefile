# codelm: `make start` brings up the daemon, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
VSCODE := editors/vscode

.PHONY: install install-dev start stop test lint bench bench-peers bench-peers-avx2 clean vsix
.PHONY: test-editors sanitize

# The everyday model (Qwen2.5-Coder-0.5B, 491 MB) and the test suite's (SmolLM2-135M, 98 MB).
install: $(STAMP)
	@$(BIN)/codelm-daemon models fetch default
	@$(BIN)/codelm-daemon models fetch smollm2-135m

# torch is installed first and pinned, so pip never resolves it to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

# What the suite, the linters and the benchmarks add (pytest, transformers, ruff, triton for
# its CPU interpreter...): not part of `make start`.
install-dev: install $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(DEV_STAMP)

start: install
	@$(BIN)/codelm-daemon start
	@echo
	@echo "Get a suggestion:   $(BIN)/codelm-daemon complete path/to/file.py:LINE:COL"
	@echo "Connect an editor:  point it at $(abspath $(BIN))/codelm-lsp (see README, Editors)"

stop:
	@$(BIN)/codelm-daemon stop

# CODELM_EDITOR_TESTS=1 (CI) adds the editor tests, with their installs (see test-editors).
test: install-dev $(if $(filter 1,$(CODELM_EDITOR_TESTS)),test-editors)
	$(BIN)/python -m pytest -q

# The native kernels (quant/kernels_x86.c) built with AddressSanitizer and UBSan, under the
# tests that run them: about 15 minutes on 2 cores, never part of `make test`. A sanitized
# library loads only into a process that starts with gcc's runtimes, hence LD_PRELOAD; -s
# lets a report reach the terminal before the process aborts.
sanitize: install-dev
	CODELM_NATIVE_SANITIZE=1 ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/quant tests/engine

lint: $(DEV_STAMP)
	$(BIN)/ruff check daemon lsp quant tests benchmarks
	$(BIN)/ruff format --check daemon lsp quant tests benchmarks

# The VS Code extension, bundled with esbuild: $(VSCODE)/codelm-<version>.vsix.
vsix: $(VSCODE)/node_modules/.installed
	cd $(VSCODE) && npm run package

$(VSCODE)/node_modules/.installed: $(VSCODE)/package-lock.json
	cd $(VSCODE) && npm ci --no-audit --no-fund
	touch $@

# The extension's unit tests, then every editor end to end; code-server, Chromium and
# Playwright are installed on first use (scripts/setup-e2e.sh).
test-editors: install-dev vsix
	bash $(VSCODE)/scripts/setup-e2e.sh $(abspath $(BIN)/python)
	cd $(VSCODE) && npm test
	CODELM_VSCODE_E2E=1 $(BIN)/python -m pytest -q tests/e2e/test_editor_*.py

bench: install-dev
	$(BIN)/python benchmarks/engine.py

# llama.cpp's llama-server, the peer the benchmarks compare against, built from the sources
# vendored in llama-cpp-python's sdist (10-40 minutes on 2 cores; never part of `make test`).
PEERS := .peers
LLAMA_CPP_PY := 0.3.36
LLAMA_SRC := $(PEERS)/src/llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp
LLAMA_CMAKE := -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF
bench-peers: $(PEERS)/bin/llama-server

$(LLAMA_SRC):
	mkdir -p $(PEERS)/src
	$(PYTHON) -m pip download --no-deps --no-binary :all: -d $(PEERS)/src llama-cpp-python==$(LLAMA_CPP_PY)
	tar xzf $(PEERS)/src/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C $(PEERS)/src

$(PEERS)/bin/llama-server: | $(LLAMA_SRC)
	cmake -S $(LLAMA_SRC) -B $(PEERS)/build $(LLAMA_CMAKE) -DGGML_NATIVE=ON
	cmake --build $(PEERS)/build --target llama-server -j$$(nproc)
	mkdir -p $(PEERS)/bin
	cp $(PEERS)/build/bin/llama-server $(PEERS)/bin/

# The same llama-server built for AVX2 alone, the peer of `benchmarks/decode.py --isa avx2`.
bench-peers-avx2: $(PEERS)/avx2/bin/llama-server

$(PEERS)/avx2/bin/llama-server: | $(LLAMA_SRC)
	cmake -S $(LLAMA_SRC) -B $(PEERS)/build-avx2 $(LLAMA_CMAKE) -DGGML_NATIVE=OFF \
		-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF
	cmake --build $(PEERS)/build-avx2 --target llama-server -j$$(nproc)
	mkdir -p $(PEERS)/avx2/bin
	cp $(PEERS)/build-avx2/bin/llama-server $(PEERS)/avx2/bin/

clean:
	rm -rf $(VENV) build *.egg-info
