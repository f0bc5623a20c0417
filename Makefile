# Two entry points: `make demo` and `make test`. Both bootstrap .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CRAFT  := $(VENV)/bin/craft
STAMP  := $(VENV)/.installed
DEMO   := out/demo-assets
PYTEST_ARGS ?= --durations=40
# checkov (tests/test_deploy.py) lives in its own venv: its pins (packaging<24, networkx<2.7,
# boto3==...) conflict with the project's. A CLI only; nothing imports it.
CHECKOV_VENV := .venv-checkov
CHECKOV      := $(CHECKOV_VENV)/bin/checkov
CHECKOV_SPEC := checkov>=3.3,<3.4

# The pinned TensorRT (deploy/base-image.toml) with its real libraries, for check-tensorrt.
TRT_VENV    := .venv-tensorrt
# GPU machines: CUDA torch (PyPI's default Linux wheel), TensorRT and onnxruntime-gpu (the `gpu` extra).
GPU_VENV    := .venv-gpu
TRT_VERSION  = $(shell $(PYTHON) -c "import tomllib; t = tomllib.load(open('deploy/base-image.toml', 'rb')); print(t['releases'][t['image']]['tensorrt'])")

.PHONY: venv demo demo-local test test-extended test-gpu clean check-tensorrt

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

$(DEMO)/recipe-toy.toml: | $(STAMP)
	$(CRAFT) demo-assets --out $(DEMO)

# In-process reference pipeline on the trained toy world: a held-out shape in a held-out style.
demo-local: $(STAMP) $(DEMO)/recipe-toy.toml
	$(CRAFT) generate --local --recipe $(DEMO)/recipe-toy.toml \
	    --prompt "a sks object <c> in zzs style <s>" --content heart --style gradient \
	    --seed 7 --out out/demo-local.png

# Served path: export the toy-world repository, serve it with Triton, generate over gRPC (out/demo.png).
demo: $(STAMP)
	VENV=$(VENV) DEMO=$(DEMO) bash scripts/demo.sh

# The default suite (about 10 minutes on 2 cores); test-extended adds the multi-process runs
# (three replicas, soak, kill under load), which .ci/run runs after it.
test: $(STAMP) $(CHECKOV)
	$(PY) -m pytest -q -p no:cacheprovider -m "not extended" $(PYTEST_ARGS)

test-extended: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m extended $(PYTEST_ARGS)

# GPU machines only (never run yet: no GPU has been available to this project): the GPU-marked
# tests (tests/test_gpu.py, tests/test_runtime_trt.py, ...) in their own venv; they fail instead
# of skipping when no CUDA device is visible. The bundled tritonserver comes without the `serve`
# extra, whose CPU onnxruntime would break onnxruntime-gpu.
test-gpu:
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q --upgrade pip
	$(GPU_VENV)/bin/pip install -q torch==2.13.0
	$(GPU_VENV)/bin/pip install -q -e '.[gpu,dev]' nvidia-pytriton
	CRAFT_REQUIRE_GPU=1 CRAFT_REQUIRE_TRITON=1 $(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider -m gpu $(PYTEST_ARGS)

# Run before changing TensorRT code: tests/test_tensorrt_api.py against the pinned TensorRT with
# its real libraries (~1-2 GB from NVIDIA's index, which `make test`'s machines cannot reach;
# there the same test runs on the bindings wheel with stand-in libraries). No GPU needed.
check-tensorrt:
	$(PYTHON) -m venv $(TRT_VENV)
	$(TRT_VENV)/bin/pip install -q --upgrade pip
	$(TRT_VENV)/bin/pip install -q --extra-index-url https://pypi.nvidia.com pytest packaging \
	    "tensorrt-cu12==$(TRT_VERSION)" "tensorrt-cu12-libs==$(TRT_VERSION)" "tensorrt-cu12-bindings==$(TRT_VERSION)"
	CRAFT_REQUIRE_TENSORRT=1 $(TRT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_tensorrt_api.py

clean:
	rm -rf out .pytest_cache
