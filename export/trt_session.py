"""TensorRT engines (``model.plan``) as sessions, for the Python-backend models and the GPU benchmark.

:class:`TrtSession` has :class:`~craft_export.ort.OrtSession`'s interface (``input_names``,
``input_ranks``, ``output_names``, ``__call__(dict of numpy) -> dict of numpy``), so the export's
engine check, the Python-backend runners and the benchmarks can use either, plus
:meth:`TrtSession.run_torch` on CUDA tensors without host copies (for DLPack tensors inside
Triton, or an in-process sampling loop).

How one call runs (TensorRT 10 "enqueueV3" API):

* one deserialised engine, one dedicated CUDA stream per session; the stream first waits for
  the caller's current stream (so inputs written there are complete), the caller's stream then
  waits for the session's stream (so outputs are complete before anything reads them);
* input shapes are set on the execution context per call (``set_input_shape``) when they differ
  from the last call's; tensor addresses are bound with ``set_tensor_address``; the engine runs
  with ``execute_async_v3(stream)``;
* output buffers are allocated once per distinct set of input shapes and cached (LRU,
  ``max_cached_shapes``); by default each call returns copies of them (made on the caller's
  stream), so results of earlier calls are never overwritten. ``run_torch(..., copy=False)``
  returns the cached buffers themselves, valid until the next call of this session;
* optional CUDA graphs (``cuda_graphs=True``): after ``graph_warmup`` eager calls with the same
  input shapes, that shape is captured into a CUDA graph and later calls with it copy their inputs
  into static buffers and replay the graph. A captured graph freezes the shapes, the tensor
  addresses *and* the execution context it was captured from (a context may stage shape data
  that a later ``set_input_shape`` changes), so every captured shape gets its own execution
  context; all of a session's contexts share one activation ("scratch") buffer, which is safe
  because they all run on the session's one stream. Capture is preceded by one eager
  ``execute_async_v3`` on the new context (TensorRT does deferred per-shape work there); a shape
  whose capture fails falls back to eager execution for good (logged once).

Concurrent launches (:meth:`TrtSession.hold`, :meth:`TrtSession.launch`, :meth:`TrtLaunch.result`):
a caller holding several sessions can enqueue a call on each before waiting for any, so the
engines run concurrently on their own streams (``craft_serving.trt_denoiser`` does this for the
two ACFG branches).

Importing this module needs neither tensorrt nor torch; both are imported when a session is made.
Written against the TensorRT 10 Python API (``tensorrt.IExecutionContext.set_input_shape``,
``set_tensor_address``, ``execute_async_v3``, ``set_device_memory``; ``ICudaEngine.num_io_tensors``,
``get_tensor_name/mode/dtype/shape``, ``get_tensor_profile_shape``, ``device_memory_size_v2``,
``create_execution_context(strategy)``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from craft_client.schema import DTYPES

log = logging.getLogger(__name__)

__all__ = ["TrtRunnerError", "TrtSession", "TrtLaunch", "trt_logger"]


class TrtRunnerError(RuntimeError):
    """A TensorRT engine could not be loaded or run."""


@functools.cache
def trt_logger():
    """The process's one TensorRT logger: every builder, runtime and refitter must share it
    (TensorRT keeps a pointer to the first logger it is given, so it must outlive them all)."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _torch_dtype(trt, dtype):
    """The torch dtype of a ``tensorrt.DataType``, through the one dtype table."""
    import torch

    for d in DTYPES.values():
        if d.tensorrt is not None and d.torch is not None and getattr(trt.DataType, d.tensorrt, None) == dtype:
            return getattr(torch, d.torch)
    raise TrtRunnerError(f"TensorRT dtype {dtype} has no torch equivalent here")


def _numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.cpu().numpy()


ShapeKey = tuple  # ((input name, shape), ...) in input order


@dataclass
class _Binding:
    """Everything cached for one set of input shapes."""

    key: ShapeKey
    outputs: dict[str, Any]  # name -> torch.Tensor (written by every run with this key)
    runs: int = 0
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    graph_context: Any = None  # the execution context the graph was captured from
    static_inputs: dict[str, Any] = field(default_factory=dict)
    graph_failed: bool = False


@dataclass
class TrtLaunch:
    """A call enqueued by :meth:`TrtSession.launch`; it keeps its inputs alive until collected."""

    session: "TrtSession"
    binding: _Binding
    feeds: dict[str, Any]

    def result(self, *, copy: bool = True) -> dict[str, Any]:
        """Make the caller's stream wait for the call; its outputs (copies made on the caller's
        stream, or with ``copy=False`` the session's buffers, valid until its next call)."""
        return self.session._collect(self, copy=copy)


class TrtSession:
    """A TensorRT engine with OrtSession's interface; see the module docstring.

    ``engine``: a ``model.plan`` path, or serialized engine bytes. ``device``: CUDA device index
    (Triton passes ``model_instance_device_id``). ``cuda_graphs``: capture a CUDA graph per
    repeated input shape. ``graph_warmup``: eager calls of a shape before it is captured (shapes
    seen once, e.g. odd dynamic-batching sizes, are never captured). ``max_cached_shapes``: output
    buffers (and graphs) kept, least recently used dropped first.
    """

    def __init__(self, engine: str | Path | bytes | bytearray | memoryview, *, device: int | str | None = None,
                 cuda_graphs: bool = False, graph_warmup: int = 1, max_cached_shapes: int = 8):
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise TrtRunnerError("TrtSession needs the tensorrt package: pip install 'craft-lora-serve[gpu]'") from exc
        import torch

        if not torch.cuda.is_available():
            raise TrtRunnerError("TrtSession needs an NVIDIA GPU (torch.cuda.is_available() is False)")
        self.trt, self.torch = trt, torch
        if isinstance(engine, (str, Path)):
            self.path: Path | None = Path(engine)
            try:
                blob = self.path.read_bytes()
            except OSError as exc:
                raise TrtRunnerError(f"cannot read TensorRT engine {self.path}: {exc}") from exc
        else:
            self.path, blob = None, bytes(engine)
        if device is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif isinstance(device, int):
            self.device = torch.device("cuda", device)
        else:
            dev = torch.device(device)
            self.device = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        if self.device.type != "cuda":
            raise TrtRunnerError(f"TrtSession runs on a CUDA device, got {device!r}")
        self.cuda_graphs = bool(cuda_graphs)
        self.graph_warmup = max(0, int(graph_warmup))
        self.max_cached_shapes = max(1, int(max_cached_shapes))
        self._lock = threading.RLock()
        self._owner: int | None = None  # thread inside hold()
        self._bindings: OrderedDict[ShapeKey, _Binding] = OrderedDict()
        self._context_key: ShapeKey | None = None  # the shapes last set on the eager context
        self._warned_graph = False
        name = str(self.path) if self.path else "<engine bytes>"

        with torch.cuda.device(self.device):
            free_before = torch.cuda.mem_get_info(self.device)[0]
            self.stream = torch.cuda.Stream(device=self.device)
            self.runtime = trt.Runtime(trt_logger())
            self.engine = self.runtime.deserialize_cuda_engine(blob)
            del blob
            if self.engine is None:
                raise TrtRunnerError(f"{name}: TensorRT could not deserialize the engine (built by another "
                                     f"TensorRT version or for another GPU?); see the TensorRT log above")
            self.scratch_bytes = int(getattr(self.engine, "device_memory_size_v2", 0)
                                     or getattr(self.engine, "device_memory_size", 0))
            self._scratch = None
            self.context = self._new_context()
            torch.cuda.synchronize(self.device)
            self.loaded_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]

        engine_ = self.engine
        names = [engine_.get_tensor_name(i) for i in range(engine_.num_io_tensors)]
        self.input_names = [n for n in names if engine_.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine_.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, engine_.get_tensor_dtype(n)) for n in names}
        self.input_ranks = {n: len(engine_.get_tensor_shape(n)) for n in self.input_names}
        for n in names:
            location = getattr(engine_, "get_tensor_location", None)
            if location is not None and location(n) != trt.TensorLocation.DEVICE:
                raise TrtRunnerError(f"{name}: tensor {n!r} lives on the host (shape tensor); not supported here")

    # -- description -----------------------------------------------------------------------

    def profile(self, name: str, index: int = 0) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shape of an input in optimisation profile ``index``."""
        return tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(name, index))

    @property
    def weights_bytes(self) -> int | None:
        """Total weight bytes of the engine (TensorRT >= 10.x ``EngineStat``), None when unknown."""
        stat = getattr(getattr(self.trt, "EngineStat", None), "TOTAL_WEIGHTS_SIZE", None)
        if stat is None or not hasattr(self.engine, "get_engine_stat"):
            return None
        return int(self.engine.get_engine_stat(stat))

    def describe(self) -> dict:
        return {
            "engine": str(self.path) if self.path else None,
            "device": str(self.device),
            "inputs": {n: {"dtype": str(self.dtypes[n]), "profile": self.profile(n)} for n in self.input_names},
            "outputs": {n: {"dtype": str(self.dtypes[n])} for n in self.output_names},
            "scratch_bytes": self.scratch_bytes,
            "weights_bytes": self.weights_bytes,
            "loaded_bytes": self.loaded_bytes,
            "cuda_graphs": self.cuda_graphs,
            "captured_shapes": [list(b.key) for b in self._bindings.values() if b.graph is not None],
        }

    # -- contexts ------------------------------------------------------------------------------

    def _new_context(self):
        """An execution context; all of them share one scratch buffer when TensorRT lets us supply it."""
        trt, torch = self.trt, self.torch
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        context = None
        if strategy is not None and self.scratch_bytes > 0:
            try:
                context = self.engine.create_execution_context(strategy)
            except TypeError:  # an older binding without the strategy argument
                context = None
            if context is not None:
                if self._scratch is None:
                    with torch.cuda.stream(self.stream):  # freed only with the session
                        self._scratch = torch.empty(self.scratch_bytes, dtype=torch.uint8, device=self.device)
                if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
                    context.set_device_memory(self._scratch.data_ptr(), self.scratch_bytes)
                else:
                    context.device_memory = self._scratch.data_ptr()
        if context is None:
            context = self.engine.create_execution_context()
        if context is None:
            raise TrtRunnerError("TensorRT could not create an execution context (out of GPU memory?)")
        return context

    def _set_shapes(self, context, key: ShapeKey) -> None:
        for name, shape in key:
            if not context.set_input_shape(name, shape):
                lo, _, hi = self.profile(name)
                raise TrtRunnerError(f"input {name!r}: shape {list(shape)} is outside the engine's profile "
                                     f"(min {list(lo)}, max {list(hi)})")
        missing = context.infer_shapes()
        if missing:
            raise TrtRunnerError(f"TensorRT cannot infer shapes; unset inputs {list(missing)}")

    def _bind(self, context, binding: _Binding, feeds: Mapping[str, Any]) -> None:
        for name, tensor in feeds.items():
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise TrtRunnerError(f"set_tensor_address failed for input {name!r}")
        for name, tensor in binding.outputs.items():
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise TrtRunnerError(f"set_tensor_address failed for output {name!r}")

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise TrtRunnerError("execute_async_v3 failed; see the TensorRT log above")

    # -- bindings (per input shapes) --------------------------------------------------------

    def _binding(self, key: ShapeKey) -> _Binding:
        binding = self._bindings.get(key)
        if binding is not None:
            self._bindings.move_to_end(key)
            return binding
        torch = self.torch
        self._set_shapes(self.context, key)
        self._context_key = key
        outputs = {}
        with torch.cuda.stream(self.stream):  # reused by this stream only; see _evict
            for name in self.output_names:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise TrtRunnerError(f"output {name!r} has a data-dependent shape {shape}; not supported")
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
        binding = _Binding(key, outputs)
        self._bindings[key] = binding
        while len(self._bindings) > self.max_cached_shapes:
            self._evict(next(iter(self._bindings)))
        return binding

    def _evict(self, key: ShapeKey) -> None:
        self.stream.synchronize()  # nothing of the dropped binding (graph, context, buffers) may be in flight
        self._bindings.pop(key)
        if self._context_key == key:
            self._context_key = None

    # -- running ---------------------------------------------------------------------------------

    def _feeds(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        torch = self.torch
        feeds = {}
        for name in self.input_names:
            if name not in inputs:
                raise TrtRunnerError(f"missing input {name!r}; the engine takes {self.input_names}")
            value = inputs[name]
            if isinstance(value, torch.Tensor):
                tensor = value
            else:  # Triton hands read-only arrays; torch wants writable memory to wrap
                array = np.ascontiguousarray(value)
                tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
            if tensor.dim() != self.input_ranks[name]:
                raise TrtRunnerError(f"input {name!r}: rank {tensor.dim()} != engine rank {self.input_ranks[name]}")
            feeds[name] = tensor.to(device=self.device, dtype=self.dtypes[name]).contiguous()
        return feeds

    @contextlib.contextmanager
    def hold(self) -> Iterator["TrtSession"]:
        """Exclusive use of the session (re-entrant): between :meth:`launch` and
        :meth:`TrtLaunch.result`, no other thread may run it (the output buffers are shared)."""
        with self._lock:
            owner, self._owner = self._owner, threading.get_ident()
            try:
                yield self
            finally:
                self._owner = owner

    def launch(self, inputs: Mapping[str, Any]) -> TrtLaunch:
        """Enqueue one call on this session's stream without waiting for it; call inside :meth:`hold`.

        Launch on several held sessions, then collect each :meth:`TrtLaunch.result`: the engines
        overlap on the GPU.
        """
        if self._owner != threading.get_ident():
            raise TrtRunnerError("TrtSession.launch needs the session held (with session.hold(): ...)")
        return self._enqueue(inputs)

    def _enqueue(self, inputs: Mapping[str, Any]) -> TrtLaunch:
        """Launch one call on this session's stream (caller holds ``self._lock``)."""
        torch = self.torch
        with torch.cuda.device(self.device):
            feeds = self._feeds(inputs)
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # inputs (and earlier readers of our outputs) are done first
            key = tuple((n, tuple(feeds[n].shape)) for n in self.input_names)
            binding = self._binding(key)
            if self.cuda_graphs and binding.graph is not None:
                with torch.cuda.stream(self.stream):
                    for name, tensor in feeds.items():
                        binding.static_inputs[name].copy_(tensor, non_blocking=True)
                    binding.graph.replay()
            elif (self.cuda_graphs and not binding.graph_failed and binding.runs >= self.graph_warmup):
                self._capture(binding, feeds)
            else:
                if self._context_key != key:
                    self._set_shapes(self.context, key)
                    self._context_key = key
                self._bind(self.context, binding, feeds)
                self._execute(self.context)
            binding.runs += 1
            return TrtLaunch(self, binding, feeds)

    def _capture(self, binding: _Binding, feeds: Mapping[str, Any]) -> None:
        """Run this call eagerly on a fresh context and capture that context's launch into a graph."""
        torch = self.torch
        context = self._new_context()
        with torch.cuda.stream(self.stream):
            static = {name: torch.empty_like(tensor) for name, tensor in feeds.items()}
            for name, tensor in feeds.items():
                static[name].copy_(tensor, non_blocking=True)
        self._set_shapes(context, binding.key)
        self._bind(context, binding, static)
        self._execute(context)  # this call's result, and TensorRT's deferred per-shape work, before capture
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._execute(context)
        except Exception as exc:  # noqa: BLE001 - any failure: this shape stays eager
            self.stream.synchronize()  # the discarded context's eager run must be over before it goes
            binding.graph_failed = True
            if not self._warned_graph:
                log.warning("CUDA graph capture failed for shapes %s; running them eagerly: %s", binding.key, exc)
                self._warned_graph = True
            return
        binding.graph, binding.graph_context, binding.static_inputs = graph, context, static

    def _collect(self, pending: TrtLaunch, copy: bool = True) -> dict[str, Any]:
        """Make the caller's stream wait for the call; copies of the outputs (made on the caller's stream)."""
        torch = self.torch
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            caller.wait_stream(self.stream)
            outputs = pending.binding.outputs
            if not copy:
                return dict(outputs)
            return {name: tensor.clone() for name, tensor in outputs.items()}

    def run_torch(self, inputs: Mapping[str, Any], *, copy: bool = True) -> dict[str, Any]:
        """Outputs as CUDA tensors on this session's device, ready on the caller's current stream.

        Inputs may be CUDA tensors (used in place when dtype and layout already fit), CPU tensors or
        numpy arrays. ``copy=False`` returns the cached output buffers: valid until the next call.
        """
        with self._lock:
            return self._collect(self._enqueue(inputs), copy=copy)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """OrtSession's interface: numpy in, numpy out (one device round trip per call)."""
        with self._lock:  # the cached buffers are ours until copied to the host
            outputs = self._collect(self._enqueue(inputs), copy=False)
            return {name: _numpy(outputs[name]) for name in self.output_names}

    def close(self) -> None:
        """Release graphs, contexts and the engine (after everything in flight has finished)."""
        with self._lock:
            self.stream.synchronize()
            self._bindings.clear()
            self.context = None
            self.engine = None
            self._scratch = None
