# Production image: NVIDIA Triton (native onnxruntime / tensorrt_plan / python backends) + craft.
#
# Base: Triton 25.01 (Ubuntu 24.04, Python 3.12, CUDA 12.8, TensorRT 10.8.0.43, ONNX Runtime 1.20.1).
# deploy/base-image.toml is the one record of that pairing; the torch pin below and the
# tensorrt/onnxruntime-gpu pins of pyproject's `gpu` extra follow it (tests/test_image.py checks).
#
# Build:  docker build -t craft-lora-serve:0.1.0 .
# Run:    docker run --gpus all --shm-size=2g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#             -v "$PWD/repo:/models" craft-lora-serve:0.1.0
#
# --shm-size: the Python-backend models (craft_pipeline, craft_catalog, python engine runners)
# exchange every input and output tensor with tritonserver through shared memory in /dev/shm,
# one region per model instance, growing with the tensors in flight (latents, text embeddings,
# decoded images: one 1024x1024 SDXL image is 12 MiB in fp32). Docker's default /dev/shm is
# 64 MiB, too small for several pipeline instances; 2 GiB leaves room for 4 instances with
# batches in flight. On Kubernetes the same is a memory-backed emptyDir (deploy/base).
FROM nvcr.io/nvidia/tritonserver:25.01-py3

# PIP_BREAK_SYSTEM_PACKAGES: Ubuntu 24.04 marks the system Python as externally managed; the
# Python backend stub runs that interpreter, so the packages must go into it, not a venv.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/tmp \
    TRITONSERVER_BIN=/opt/tritonserver/bin/tritonserver

WORKDIR /opt/craft
COPY pyproject.toml README.md ./
COPY craft_ops ./craft_ops
COPY export ./export
COPY serving ./serving
COPY training ./training
COPY reference ./reference
COPY cli ./cli
COPY client ./client
COPY model_repository ./model_repository

# torch built for the container's CUDA 12.8 and Python 3.12 (cu128), then the package with its
# GPU extra (and s3: boto3 for `craft sync`, the cloud overlay's repository copy). TensorRT's
# libraries are published on NVIDIA's index (PyPI holds download stubs).
# DL3013: ".[gpu,s3]" is this repository itself; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir "torch==2.8.0" --index-url https://download.pytorch.org/whl/cu128 \
    && python3 -m pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com ".[gpu,s3]"

# Any non-root UID works (the deploy/ manifests run as 10001); files above are world-readable.
USER 10001:10001

EXPOSE 8000 8001 8002
VOLUME ["/models"]

HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]

# --host 0.0.0.0: craft serve binds loopback by default; in a container the ports are published.
# --log-file: the default (beside the repository, "/") is not writable for the non-root user.
ENTRYPOINT ["craft", "serve", "--repo", "/models"]
CMD ["--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002", \
     "--log-file", "/tmp/tritonserver.log"]
