"""A real tritonserver (pytriton's bundled 2.51 on CPU machines) with Python-backend models.

One module-scoped server over a throw-away model repository proves: the stubs run in this
venv (torch, numpy, onnxruntime and the editable craft_* packages import), HTTP and gRPC
inference, async BLS, decoupled streaming, typed model errors, dynamic batching, request
cancellation seen by the model, and explicit-mode loading of a model added while it runs.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from craft_serving.triton_server import (
    ServerConfig,
    TritonServer,
    TritonServerError,
    backend_dir,
    find_tritonserver,
    server_args,
    server_env,
)

pytestmark = pytest.mark.server

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def _config(name: str, body: str) -> str:
    return f'name: "{name}"\nbackend: "python"\n' + textwrap.dedent(body)


_VECTOR_IO = """
    max_batch_size: 0
    input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
    output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
    instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# Doubles X with torch (zero-copy in and out via DLPack) and reports where its imports
# came from, so the test can check the stub really runs in this venv.
_DOUBLE_PY = """
import json
import sys

import numpy as np
import onnxruntime
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

import craft_export
import craft_ops


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(1)
        self.info = json.dumps({
            "numpy": np.__version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "craft_export": craft_export.__file__,
            "craft_ops": craft_ops.__file__,
            "executable": sys.executable,
            "prefix": sys.prefix,
        })

    def execute(self, requests):
        responses = []
        for request in requests:
            x = from_dlpack(pb_utils.get_input_tensor_by_name(request, "X").to_dlpack())
            y = pb_utils.Tensor.from_dlpack("Y", to_dlpack(x * 2))
            info = pb_utils.Tensor("INFO", np.array([self.info.encode()], dtype=np.object_))
            responses.append(pb_utils.InferenceResponse(output_tensors=[y, info]))
        return responses
"""

_DOUBLE_CONFIG = _config(
    "double",
    """
    max_batch_size: 0
    input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
    output [
      { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] },
      { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] }
    ]
    instance_group [ { kind: KIND_CPU count: 1 } ]
    """,
)

# Async BLS: fans each request out to "double" twice concurrently, then chains a third call.
# Tensors that already live in the backend's shared memory (request inputs, BLS outputs)
# are passed on as the same pb_utils.Tensor objects: zero-copy. A tensor can't be renamed,
# so feeding output "Y" in as input "X" goes through from_dlpack (one copy into shm).
_BLS_PY = """
import asyncio

import triton_python_backend_utils as pb_utils


async def _double(tensor):
    request = pb_utils.InferenceRequest(
        model_name="double", requested_output_names=["Y"], inputs=[tensor]
    )
    response = await request.async_exec()
    if response.has_error():
        raise pb_utils.TritonModelException(response.error().message())
    return pb_utils.get_output_tensor_by_name(response, "Y")


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X")
            first, second = await asyncio.gather(_double(x), _double(x))
            # feed the BLS output tensor back in as the next input: 2x -> 4x
            renamed = pb_utils.Tensor.from_dlpack("X", first.to_dlpack())
            quad = await _double(renamed)
            assert (second.as_numpy() == first.as_numpy()).all()
            # "double" names its output "Y" like this model does: return it as is.
            responses.append(pb_utils.InferenceResponse(output_tensors=[quad]))
        return responses
"""

# Decoupled: three responses X, X+1, X+2 then an empty response carrying the final flag.
_STREAM_PY = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            for step in range(3):
                if sender.is_cancelled():
                    break
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x + step)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""

_STREAM_CONFIG = _config(
    "stream",
    _VECTOR_IO
    + """
    model_transaction_policy { decoupled: true }
    """,
)

_REJECT_MESSAGE = "X must be non-negative"

_VALIDATE_PY = f"""
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X")
            if (x.as_numpy() < 0).any():
                error = pb_utils.TritonError("{_REJECT_MESSAGE}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                y = pb_utils.Tensor.from_dlpack("Y", x.to_dlpack())
                responses.append(pb_utils.InferenceResponse(output_tensors=[y]))
        return responses
"""

# Dynamic batching: Triton hands execute() several requests at once (it does not merge
# them into one tensor for Python models); each response reports the batch it was in.
_BATCHER_PY = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        n = np.array([[len(requests)]], dtype=np.int32)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("N", n)]) for _ in requests]
"""

_BATCHER_CONFIG = _config(
    "batcher",
    """
    max_batch_size: 8
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
    output [ { name: "N" data_type: TYPE_INT32 dims: [ 1 ] } ]
    dynamic_batching { max_queue_delay_microseconds: 300000 }
    instance_group [ { kind: KIND_CPU count: 1 } ]
    """,
)

# Cancellation: both models run until the client cancels, then write what they observed
# to the file named by the request parameter "marker" (the client can't see it otherwise).
_SLEEPER_PY = """
import json
import pathlib
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            marker = pathlib.Path(json.loads(request.parameters())["marker"])
            marker.with_suffix(".started").touch()
            deadline = time.monotonic() + 20
            while not request.is_cancelled() and time.monotonic() < deadline:
                time.sleep(0.02)
            marker.write_text(f"cancelled={request.is_cancelled()}")
            error = pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)
            responses.append(pb_utils.InferenceResponse(error=error))
        return responses
"""

_TICKER_PY = """
import json
import pathlib
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            marker = pathlib.Path(json.loads(request.parameters())["marker"])
            sender = request.get_response_sender()
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            deadline = time.monotonic() + 20
            while not sender.is_cancelled() and time.monotonic() < deadline:
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]))
                time.sleep(0.05)
            marker.write_text(f"cancelled={sender.is_cancelled()}")
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""

_LATE_PY = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() + 1)]
            )
            for r in requests
        ]
"""

MODELS = {
    "double": (_DOUBLE_CONFIG, _DOUBLE_PY),
    "bls": (_config("bls", _VECTOR_IO), _BLS_PY),
    "stream": (_STREAM_CONFIG, _STREAM_PY),
    "validate": (_config("validate", _VECTOR_IO), _VALIDATE_PY),
    "batcher": (_BATCHER_CONFIG, _BATCHER_PY),
    "sleeper": (_config("sleeper", _VECTOR_IO), _SLEEPER_PY),
    "ticker": (_config("ticker", _VECTOR_IO + "model_transaction_policy { decoupled: true }\n"), _TICKER_PY),
}


# The exporter's engine runner (model_repository/engine_runner/model.py -> EngineModel) over a
# small ONNX graph Y = 2 X + T, T a per-item scalar: once with numpy I/O (the ONNX Runtime
# default) and once with torch tensors through DLPack (the TensorRT default, here on CPU).
_ENGINE_CONFIG = """
    max_batch_size: 4
    input [
      {{ name: "X" data_type: TYPE_FP32 dims: [ 3 ] }},
      {{ name: "T" data_type: TYPE_FP32 dims: [ 1 ] reshape {{ shape: [ ] }} }}
    ]
    output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 3 ] }} ]
    dynamic_batching {{ max_queue_delay_microseconds: 200000 }}
    instance_group [ {{ kind: KIND_CPU count: 1 }} ]
    parameters {{ key: "craft_io" value {{ string_value: "{io}" }} }}
    parameters {{ key: "FORCE_CPU_ONLY_INPUT_TENSORS" value {{ string_value: "no" }} }}
"""
ENGINE_MODELS = {f"engine_{io}": io for io in ("numpy", "dlpack")}


def _write_engine_model(repo: Path, name: str, io: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    version = repo / name / "1"
    version.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "two"], ["X2"]),
         helper.make_node("Unsqueeze", ["T", "axis"], ["T1"]),
         helper.make_node("Add", ["X2", "T1"], ["Y"])],
        "affine",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", 3]),
         helper.make_tensor_value_info("T", TensorProto.FLOAT, ["B"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("axis", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # what any ORT reads
    onnx.save(model, str(version / "model.onnx"))
    template = Path(__file__).resolve().parents[1] / "model_repository" / "engine_runner" / "model.py"
    (version / "model.py").write_text(template.read_text())
    (repo / name / "config.pbtxt").write_text(_config(name, _ENGINE_CONFIG.format(io=io)))


def _write_model(repo: Path, name: str, config: str, source: str) -> None:
    version = repo / name / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(textwrap.dedent(source).lstrip())
    (repo / name / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def binary() -> Path:
    try:
        return find_tritonserver()
    except TritonServerError as exc:
        if os.environ.get("CI") or os.environ.get("CRAFT_REQUIRE_TRITON"):  # CI must run these, not skip them
            raise RuntimeError(f"tritonserver is required here (CI / CRAFT_REQUIRE_TRITON): {exc}") from exc
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server(binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("triton")
    repo = root / "models"
    for name, (config, source) in MODELS.items():
        _write_model(repo, name, config, source)
    for name, io in ENGINE_MODELS.items():
        _write_engine_model(repo, name, io)
    config = ServerConfig.with_free_ports(repo)
    with TritonServer(config, binary=binary, log_path=root / "tritonserver.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: TritonServer) -> Iterator[tritonclient_http.InferenceServerClient]:
    client = tritonclient_http.InferenceServerClient(server.config.http_url, concurrency=4)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server: TritonServer) -> Iterator[tritonclient_grpc.InferenceServerClient]:
    client = tritonclient_grpc.InferenceServerClient(server.config.grpc_url)
    yield client
    client.close()


def _http_input(x: np.ndarray) -> tritonclient_http.InferInput:
    tensor = tritonclient_http.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _grpc_input(x: np.ndarray) -> tritonclient_grpc.InferInput:
    tensor = tritonclient_grpc.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


X = np.array([0.5, -1.0, 3.0, 8.25], dtype=np.float32)


# --------------------------------------------------------------------------- launcher


def test_launcher_pieces(server: TritonServer) -> None:
    backends = backend_dir(server.binary)
    assert (backends / "python" / "libtriton_python.so").is_file()
    assert (backends / "python" / "triton_python_backend_stub").is_file()
    assert backend_dir(server.binary) == backends  # cached, not rebuilt
    env = server_env(server.binary)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    args = server_args(server.config, backends, server.shm_prefix)
    assert "--model-control-mode=explicit" in args and "--load-model=*" in args
    assert all(flag in args for flag in ("--exit-on-error=true", "--strict-readiness=true"))
    with pytest.raises(ValueError):
        ServerConfig(server.config.repo, 1, 1, 2)


def test_backend_dir_is_built_atomically(binary: Path, tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        dirs = set(pool.map(lambda _: backend_dir(binary, cache_root=tmp_path), range(4)))
    assert len(dirs) == 1
    (built,) = dirs
    assert os.access(built / "python" / "triton_python_backend_stub", os.X_OK)
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no half-built leftovers


def test_find_tritonserver_rejects_bad_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITONSERVER_BIN", str(tmp_path / "nope"))
    with pytest.raises(TritonServerError, match="TRITONSERVER_BIN"):
        find_tritonserver()


# --------------------------------------------------------------------------- (a)


def test_double_http_and_grpc_in_venv(server: TritonServer, http, grpc) -> None:
    import craft_export

    result = http.infer("double", [_http_input(X)])
    np.testing.assert_array_equal(result.as_numpy("Y"), X * 2)
    info = json.loads(result.as_numpy("INFO")[0])
    assert info["numpy"] == np.__version__
    assert Path(info["craft_export"]) == Path(craft_export.__file__)
    assert Path(info["prefix"]) == Path(sys.prefix)

    result = grpc.infer("double", [_grpc_input(X)])
    np.testing.assert_array_equal(result.as_numpy("Y"), X * 2)


# --------------------------------------------------------------------------- (b)


def test_async_bls(http) -> None:
    result = http.infer("bls", [_http_input(X)])
    np.testing.assert_array_equal(result.as_numpy("Y"), X * 4)


# --------------------------------------------------------------------------- (c)


def test_decoupled_stream(server: TritonServer) -> None:
    responses: queue.Queue = queue.Queue()
    client = tritonclient_grpc.InferenceServerClient(server.config.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(
            "stream", [_grpc_input(X)], request_id="r1", enable_empty_final_response=True
        )
        outputs = []
        while True:
            result, error = responses.get(timeout=30)
            assert error is None, error
            response = result.get_response()
            if result.as_numpy("Y") is not None:
                outputs.append(result.as_numpy("Y"))
            if response.parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    finally:
        client.close()
    assert len(outputs) == 3
    for step, y in enumerate(outputs):
        np.testing.assert_array_equal(y, X + step)


# --------------------------------------------------------------------------- (d)


def test_model_error_is_reported_and_server_stays_ready(http, grpc) -> None:
    with pytest.raises(InferenceServerException, match=_REJECT_MESSAGE) as http_err:
        http.infer("validate", [_http_input(X)])
    assert http_err.value.status() == "400"  # INVALID_ARG -> HTTP 400
    with pytest.raises(InferenceServerException, match=_REJECT_MESSAGE) as grpc_err:
        grpc.infer("validate", [_grpc_input(X)])
    assert grpc_err.value.status() == "StatusCode.INVALID_ARGUMENT"

    assert http.is_server_ready() and http.is_model_ready("validate")
    ok = np.abs(X)
    np.testing.assert_array_equal(http.infer("validate", [_http_input(ok)]).as_numpy("Y"), ok)


# --------------------------------------------------------------------------- dynamic batching


def test_dynamic_batching_groups_requests(grpc) -> None:
    results: queue.Queue = queue.Queue()
    for i in range(4):
        x = np.array([[float(i)]], dtype=np.float32)
        grpc.async_infer(
            "batcher", [_grpc_input(x)], callback=lambda result, error: results.put((result, error))
        )
    sizes = []
    for _ in range(4):
        result, error = results.get(timeout=30)
        assert error is None, error
        sizes.append(int(result.as_numpy("N")[0, 0]))
    assert max(sizes) > 1, sizes


# --------------------------------------------------------------------------- engine runner I/O


@pytest.mark.parametrize("name", sorted(ENGINE_MODELS))
def test_engine_runner_batches_requests_with_numpy_and_dlpack_io(grpc, name) -> None:
    rng = np.random.default_rng(0)
    requests = []
    for batch in (1, 2, 1, 3, 2):  # 9 items > max_batch_size 4: Triton and run_batched both split
        x = rng.standard_normal((batch, 3)).astype(np.float32)
        t = rng.standard_normal((batch, 1)).astype(np.float32)
        requests.append((x, t))
    results: queue.Queue = queue.Queue()
    for i, (x, t) in enumerate(requests):
        inputs = [tritonclient_grpc.InferInput("X", list(x.shape), "FP32"),
                  tritonclient_grpc.InferInput("T", list(t.shape), "FP32")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(t)
        grpc.async_infer(name, inputs, callback=lambda result, error, i=i: results.put((i, result, error)))
    for _ in requests:
        i, result, error = results.get(timeout=60)
        assert error is None, error
        x, t = requests[i]
        np.testing.assert_allclose(result.as_numpy("Y"), 2 * x + t, rtol=0, atol=1e-6)
    stats = grpc.get_inference_statistics(name, as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) == 9
    assert int(stats["execution_count"]) < len(requests)  # some requests ran together


# --------------------------------------------------------------------------- cancellation


def _wait_for(path: Path, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"model never wrote {path}"
        time.sleep(0.02)
    time.sleep(0.05)  # let the writer finish
    return path.read_text()


def test_request_cancellation_reaches_model(grpc, tmp_path: Path) -> None:
    marker = tmp_path / "sleeper.txt"
    results: queue.Queue = queue.Queue()
    call = grpc.async_infer(
        "sleeper",
        [_grpc_input(X)],
        callback=lambda result, error: results.put(error),
        parameters={"marker": str(marker)},
    )
    _wait_for(marker.with_suffix(".started"))
    call.cancel()
    assert "CANCELLED" in str(results.get(timeout=15))
    assert _wait_for(marker) == "cancelled=True"  # request.is_cancelled()


def test_stream_cancellation_reaches_model(server: TritonServer, tmp_path: Path) -> None:
    marker = tmp_path / "ticker.txt"
    responses: queue.Queue = queue.Queue()
    client = tritonclient_grpc.InferenceServerClient(server.config.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: responses.put(error))
        client.async_stream_infer("ticker", [_grpc_input(X)], parameters={"marker": str(marker)})
        assert responses.get(timeout=15) is None  # streaming has started
        client.stop_stream(cancel_requests=True)
        assert _wait_for(marker) == "cancelled=True"  # response_sender.is_cancelled()
    finally:
        client.close()


# --------------------------------------------------------------------------- (e)


def test_load_model_added_while_running(server: TritonServer, http) -> None:
    _write_model(server.config.repo, "late", _config("late", _VECTOR_IO), _LATE_PY)
    assert not http.is_model_ready("late")
    http.load_model("late")
    try:
        assert http.is_model_ready("late")
        np.testing.assert_array_equal(http.infer("late", [_http_input(X)]).as_numpy("Y"), X + 1)
    finally:
        http.unload_model("late")
    assert server.running


# --------------------------------------------------------------------------- failures


def test_broken_model_fails_fast_with_log_tail(binary: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    _write_model(repo, "broken", _config("broken", _VECTOR_IO), "import no_such_module_xyz\n")
    server = TritonServer(ServerConfig.with_free_ports(repo), binary=binary, log_path=tmp_path / "log")
    with pytest.raises(TritonServerError, match="no_such_module_xyz"), server:
        pass
    assert not server.running
