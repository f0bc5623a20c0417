# Two entry points: `make demo` and `make test`. Both bootstrap .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CRAFT  := $(VENV)/bin/craft
STAMP  := $(VENV)/.installed
DEMO   := out/demo-assets
PYTEST_ARGS ?=

.PHONY: venv demo demo-local test test-gpu bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel from local disk; GPU machines use the `gpu` extra / the NGC image instead.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,serve]'
	touch $(STAMP)

venv: $(STAMP)

$(DEMO)/recipe-sd15.toml: | $(STAMP)
	$(CRAFT) demo-assets --out $(DEMO)

# In-process reference pipeline on the tiny SD 1.5 model.
demo-local: $(STAMP) $(DEMO)/recipe-sd15.toml
	$(CRAFT) generate --local --recipe $(DEMO)/recipe-sd15.toml \
	    --prompt "a dog <c> in watercolor style <s>" --content dog --style watercolor \
	    --seed 7 --out out/demo.png

# Served path: export the tiny SD 1.5 repository, serve it with Triton, generate over gRPC.
demo: $(STAMP)
	VENV=$(VENV) DEMO=$(DEMO) bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
