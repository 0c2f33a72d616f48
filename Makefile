# Two commands set everything up on a fresh machine:
#   make demo   train a small ViT on CIFAR-10 and print its test accuracy
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= $(firstword $(wildcard ../shared/data/cifar-10-batches-bin) cifar10)
ifndef RUN  # the demo's run directory, one per invocation
RUN    := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif

.PHONY: demo test test-slow install browser clean

install: $(VENV)/.installed

# torch is pinned through constraints.txt so that the reference packages never replace it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Train a small ViT on CIFAR-10 for a few minutes, evaluate it on the test set, show the plots.
demo: install
	$(VENV)/bin/vitlab train --recipe demo --data $(DATA) --out $(RUN)
	$(VENV)/bin/vitlab eval $(RUN)/last.safetensors --data $(DATA)
	@echo "plots: $(RUN)/curves.png $(RUN)/confusion_test.png"

test: install browser
	$(PY) -m pytest -q

# Debian's Chromium and its driver for the browser test of `vitlab serve` (tests/test_serve_browser.py),
# installed with apt-get where they are missing; never a browser download.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	  else echo "no apt-get: the browser test of vitlab serve will be skipped"; fi; \
	fi

# The slow cases (marked `slow`, left out of `make test`): the kill matrix of tests/test_kill_matrix.py.
test-slow: install browser
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
