# Production image: NVIDIA Triton (native onnxruntime / tensorrt_plan / python backends) + craft.
# Build:  docker build -t craft-lora-serve .
# Run:    docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 -v "$PWD/repo:/models" craft-lora-serve
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
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

# torch with CUDA from the PyTorch index, then the package with its GPU extra
# (tensorrt, onnxruntime-gpu); the container's Python runs the Python-backend models.
# DL3013: ".[gpu]" is this repository itself; its dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir "torch==2.5.1" --index-url https://download.pytorch.org/whl/cu124 \
    && python3 -m pip install --no-cache-dir ".[gpu]"

EXPOSE 8000 8001 8002
VOLUME ["/models"]

HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]

ENTRYPOINT ["craft", "serve", "--repo", "/models"]
CMD ["--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"]
