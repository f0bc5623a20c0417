# Two entry points: `make demo` and `make test`. Both bootstrap .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CRAFT  := $(VENV)/bin/craft
STAMP  := $(VENV)/.installed
DEMO   := out/demo-assets
PYTEST_ARGS ?=
# checkov (tests/test_deploy.py) lives in its own venv: its pins (packaging<24, networkx<2.7,
# boto3==...) conflict with the project's. A CLI only; nothing imports it.
CHECKOV_VENV := .venv-checkov
CHECKOV      := $(CHECKOV_VENV)/bin/checkov
CHECKOV_SPEC := checkov>=3.3,<3.4

.PHONY: venv demo demo-local test test-gpu bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel from local disk; GPU machines use the `gpu` extra / the NGC image instead.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,serve]'
	touch $(STAMP)

$(CHECKOV):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q '$(CHECKOV_SPEC)'

venv: $(STAMP) $(CHECKOV)

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

test: $(STAMP) $(CHECKOV)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
