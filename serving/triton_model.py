"""Triton glue for the Python-backend models; the ``model.py`` files only forward to these classes.

``pb_utils`` (``triton_python_backend_utils``) exists only inside the Python-backend stub,
so it is handed in rather than imported here.

* :class:`PipelineModel` - ``craft_pipeline`` (one response per request) and
  ``craft_pipeline_stream`` (decoupled: progress messages, then the image). Each request
  runs the synchronous pipeline in a worker thread; its network calls go back to the
  stub's event loop as BLS ``async_exec`` calls, both ACFG branches in flight at once.
* :class:`EngineModel` - a network (ONNX Runtime session, or a TensorRT plan on a GPU) served
  as a Python model, with the requests Triton batched together run as one session call.
* ``craft_catalog``: :mod:`.catalog`.

Triton's tensor layouts stay here: a per-item scalar, ``(B,)`` to the networks, is ``dims: [1]``
in ``config.pbtxt`` (:func:`craft_export.triton_config.config_pbtxt`), so it travels as ``(B, 1)``.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from craft_export.ort import OrtSession
from craft_ops.conditioning import to_uint8
from craft_ops.request import RequestError

from .batching import run_batched
from .manifest import read_manifest
from .manifest_watch import ManifestWatch, load_missing, stamp_of
from .model_keys import LoadedKeys
from .runtime import Cancelled, NetCall, PipelineRuntime, request_from_arrays
from .shutdown import SHUTTING_DOWN, DrainGate

__all__ = ["PipelineSettings", "PipelineModel", "EngineModel"]


def to_wire(value):
    """A network's per-item scalar input ``(B,)`` as Triton carries it: ``(B, 1)`` (``dims: [1]``)."""
    return value.reshape(-1, 1) if value.ndim == 1 else value


def from_wire(value, rank: int):
    """Triton's ``(B, 1)`` per-item scalars back to the ``(B,)`` a graph of that rank takes."""
    while value.ndim > rank and value.shape[-1] == 1:
        value = value.reshape(value.shape[:-1])
    return value


class BlsError(RuntimeError):
    """A network call made through BLS failed."""


class ModelUnavailable(BlsError):
    """A network the request needs is being reloaded by craft serve (its stub process died): UNAVAILABLE."""

#: how often a worker waiting on BLS calls looks for a broken-model mark (:mod:`.shutdown`)
BROKEN_POLL_S = 0.1


@dataclass(frozen=True)
class PipelineSettings:
    """What ``initialize`` reads once from Triton's ``args`` and the model config."""

    repo: Path
    model_name: str
    streaming: bool
    workers: int
    device: str  # "cpu", or "cuda:<i>" when the repository's engines are TensorRT on a GPU
    outputs: frozenset[str] = frozenset()  # the config's outputs (a repository exported before "manifest" lacks it)

    @classmethod
    def from_args(cls, args: dict[str, str], repo: Path, runtime: str | None) -> "PipelineSettings":
        """``runtime``: the manifest's; latents live on the GPU when the engines are TensorRT
        and CUDA is visible, else on the CPU."""
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        streaming = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        on_gpu = runtime == "tensorrt" and torch.cuda.is_available()
        return cls(
            repo=repo,
            model_name=args["model_name"],
            streaming=streaming,
            workers=int(params.get("workers", "4") or 4),
            device=f"cuda:{int(args.get('model_instance_device_id') or 0)}" if on_gpu else "cpu",
            outputs=frozenset(o["name"] for o in config.get("output", [])),
        )


def _error(pb_utils, exc: BaseException):
    if isinstance(exc, RequestError):
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
    if isinstance(exc, ModelUnavailable):
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE)
    if isinstance(exc, Cancelled):
        return pb_utils.TritonError(str(exc), getattr(pb_utils.TritonError, "CANCELLED", pb_utils.TritonError.UNKNOWN))
    return pb_utils.TritonError(f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)


class PipelineModel:
    """The CRAFT-LoRA pipeline as a Triton Python model (plain or decoupled)."""

    def __init__(self, pb_utils, args: dict[str, str]):
        self.pb = pb_utils
        repo = Path(args["model_repository"]).resolve().parent
        # stamp before reading: a manifest replaced in between is read again on the next request
        stamp = stamp_of(repo)
        view = read_manifest(repo)
        self.settings = PipelineSettings.from_args(args, repo, view.runtime)
        self.pool = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="craft")
        # manifest re-reads and model loads run here, one at a time, never on the event loop
        # (in-flight requests' BLS calls keep flowing while a new variant loads)
        self._reloader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="craft-reload")
        self.log = pb_utils.Logger
        self.gate = DrainGate(self.settings.model_name)  # craft serve's graceful stop (:mod:`.shutdown`)
        self.watch = ManifestWatch(repo, PipelineRuntime(view, self._infer_many, self.settings.device), stamp,
                                   self.log.log_warn)
        self.keys = LoadedKeys(repo)  # models a re-export rebuilds under the same name are reloaded
        self.keys.note(view.served)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_gpu = self.settings.device != "cpu"
        self._bls_extra = {}
        if self._on_gpu:
            device = torch.device(self.settings.device).index or 0
            self._bls_extra["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device)

    # -- manifest (re)loading: a re-export is picked up on the next request ------------------

    async def _refresh_if_changed(self) -> None:
        """A cheap stat on the loop; the re-read and model loads (seconds) on the reload thread, one at a
        time, so concurrent requests that all saw the change reload once (:mod:`.manifest_watch`)."""
        if self.watch.changed():
            await self._loop.run_in_executor(self._reloader, self.watch.refresh, self._runtime_for)

    def _runtime_for(self, view) -> PipelineRuntime:
        """A new manifest's runtime, after loading the models it adds (a model that fails rejects it)."""
        load_missing(self.pb, view, self.keys)
        runtime = PipelineRuntime(view, self._infer_many, self.settings.device)
        self.log.log_info(f"craft: manifest reloaded: {len(view.catalog)} LoRAs, "
                          f"{len(set(view.variants.values()))} baked UNets")
        return runtime

    # -- BLS -----------------------------------------------------------------------------------

    def _infer_many(self, calls):
        """Runs on a worker thread: hands the calls to the event loop and waits for all of them.

        A network craft serve marks broken (its stub died: Triton would hold the call for about 20 s
        before failing it) fails the request at once, naming the model; the abandoned call ends on
        its own."""
        models = {c.model for c in calls}
        self._raise_if_broken(models)
        future = asyncio.run_coroutine_threadsafe(self._bls(calls), self._loop)
        while True:
            try:
                return future.result(timeout=BROKEN_POLL_S)
            except FutureTimeout:
                if future.done():  # the calls themselves raised a TimeoutError
                    raise
                self._raise_if_broken(models)

    def _raise_if_broken(self, models) -> None:
        broken = self.gate.broken(sorted(models))
        if broken is not None:
            raise ModelUnavailable(f"{broken[0]}: {broken[1]}")

    def _tensor(self, name: str, value: torch.Tensor):
        """torch -> pb_utils.Tensor: DLPack for device tensors (no host copy), numpy for host ones."""
        if isinstance(value, np.ndarray):  # BYTES selectors of the UNet model
            return self.pb.Tensor(name, value)
        if value.device.type != "cpu":
            return self.pb.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))
        return self.pb.Tensor(name, np.ascontiguousarray(value.detach().numpy()))

    def _from_pb(self, tensor) -> torch.Tensor:
        if self._on_gpu:
            return from_dlpack(tensor.to_dlpack()).to(self.settings.device)
        return torch.from_numpy(tensor.as_numpy())

    async def _bls(self, calls: list[NetCall]) -> list[dict[str, torch.Tensor]]:
        pb = self.pb
        inputs = [[self._tensor(k, to_wire(v)) for k, v in c.inputs.items()] for c in calls]
        if self._on_gpu:  # after _tensor's .contiguous() copies: DLPack consumers do not follow stream order
            torch.cuda.current_stream(self.settings.device).synchronize()
        requests = [pb.InferenceRequest(model_name=c.model, requested_output_names=list(c.outputs), inputs=ins,
                                        **self._bls_extra) for c, ins in zip(calls, inputs)]
        responses = await asyncio.gather(*(r.async_exec() for r in requests))
        outs = []
        for call, resp in zip(calls, responses):
            if resp.has_error():
                raise BlsError(f"{call.model}: {resp.error().message()}")
            outs.append({n: self._from_pb(pb.get_output_tensor_by_name(resp, n)) for n in call.outputs})
        return outs

    # -- requests --------------------------------------------------------------------------------

    async def execute(self, requests: list[Any]):
        self._loop = asyncio.get_running_loop()
        await self._refresh_if_changed()
        if self.settings.streaming:
            await asyncio.gather(*(self._stream_one(r) for r in requests))
            return None
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def _manifest_tensors(self, runtime: PipelineRuntime) -> list:
        """The id of the manifest a request runs under (:func:`craft_serving.manifest.manifest_id`), as an
        output of every response; left out where the repository's config does not declare it yet."""
        if "manifest" not in self.settings.outputs:
            return []
        return [self.pb.Tensor("manifest", np.array([runtime.repo.manifest_id.encode()], dtype=np.object_))]

    def _image_response(self, images: np.ndarray, plan, runtime: PipelineRuntime):
        pb = self.pb
        tensors = [pb.Tensor("image", np.ascontiguousarray(images)), *self._manifest_tensors(runtime)]
        if plan.notes:
            tensors.append(pb.Tensor("notes", np.array([n.encode() for n in plan.notes], dtype=np.object_)))
        return pb.InferenceResponse(output_tensors=tensors)

    async def _generate(self, request, progress=None, cancelled=None):
        """Parse on the loop thread, run the pipeline on a worker thread. The whole request runs on the
        manifest in service when it starts (``progress(preview, runtime)`` builds the progress callback)."""
        runtime = self.watch.current
        req, preview = request_from_arrays({t.name(): t.as_numpy() for t in request.inputs()}, runtime.repo.limits)
        images, plan = await self._loop.run_in_executor(
            self.pool,
            lambda: runtime.generate(req, progress=progress and progress(preview, runtime), cancelled=cancelled))
        for note in plan.notes:
            self.log.log_info(f"craft: {note}")
        return self._image_response(images, plan, runtime)

    def _failed(self, exc: BaseException):
        if isinstance(exc, ModelUnavailable):
            self.log.log_warn(f"craft: request failed: {exc}")
        if isinstance(exc, Cancelled):
            self.log.log_info(f"craft: {exc}")  # the step it stopped at: tests and operators read it here
        return self.pb.InferenceResponse(error=_error(self.pb, exc))

    def _refused(self):
        unavailable = self.pb.TritonError(SHUTTING_DOWN, self.pb.TritonError.UNAVAILABLE)
        return self.pb.InferenceResponse(error=unavailable)

    async def _one(self, request):
        with self.gate.admit() as admitted:
            if not admitted:
                return self._refused()
            try:
                return await self._generate(request, cancelled=request.is_cancelled)
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
                return self._failed(exc)

    async def _stream_one(self, request) -> None:
        pb = self.pb
        sender = request.get_response_sender()

        def progress_every(preview: int, runtime: PipelineRuntime):
            def progress(step: int, total: int, latents) -> None:
                tensors = [pb.Tensor("step", np.array([step], dtype=np.int32)),
                           pb.Tensor("total_steps", np.array([total], dtype=np.int32)),
                           *self._manifest_tensors(runtime)]
                if preview and step % preview == 0:
                    tensors.append(pb.Tensor("preview", _preview(latents)))
                sender.send(pb.InferenceResponse(output_tensors=tensors))
            return progress

        with self.gate.admit() as admitted:
            try:
                if not admitted:
                    response = self._refused()
                else:
                    response = await self._generate(request, progress=progress_every, cancelled=sender.is_cancelled)
            except Exception as exc:  # noqa: BLE001
                response = self._failed(exc)
            sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def close(self) -> None:
        self.gate.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._reloader.shutdown(wait=False, cancel_futures=True)


def _preview(latents) -> np.ndarray:
    """A cheap RGB preview of latents (first 3 channels, min-max scaled), (B, h, w, 3) uint8."""
    x = latents[:, :3].float()
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    return to_uint8((x - lo) / (hi - lo).clamp_min(1e-6))


@dataclass(frozen=True)
class EngineSettings:
    model_dir: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    max_batch: int
    threads: int
    runtime: str  # "onnxruntime" | "tensorrt"
    cuda_graphs: bool
    device: int
    io: str  # "numpy" (as_numpy / numpy outputs) | "dlpack" (torch tensors in and out, no host copies on a GPU)

    @classmethod
    def from_args(cls, args: dict[str, str]) -> "EngineSettings":
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        on_gpu = args.get("model_instance_kind") == "GPU"
        return cls(
            model_dir=Path(args["model_repository"]) / args["model_version"],
            inputs=tuple(i["name"] for i in config["input"]),
            outputs=tuple(o["name"] for o in config["output"]),
            max_batch=max(1, int(config.get("max_batch_size", 1))),
            threads=int(params.get("threads", "0") or 0),
            runtime=params.get("craft_runtime", "onnxruntime") or "onnxruntime",
            cuda_graphs=params.get("cuda_graphs", "").lower() in ("1", "true", "yes"),
            device=int(args.get("model_instance_device_id") or 0) if on_gpu else 0,
            io=params.get("craft_io", "") or "numpy",
        )


class EngineModel:
    """An exported network (ONNX Runtime, or a TensorRT plan on a GPU) as a batching Python-backend model.

    ``craft_io`` (model config parameter) picks how tensors cross the Python backend:

    * ``numpy`` (the default): ``as_numpy()`` in, numpy outputs;
    * ``dlpack`` (what ``craft export --runtime tensorrt`` writes): every input is wrapped as a torch tensor through DLPack
      (``FORCE_CPU_ONLY_INPUT_TENSORS: no`` lets Triton leave GPU-resident BLS inputs on the
      GPU), the session's ``run_torch`` runs the batch, and the outputs go back through
      ``Tensor.from_dlpack`` - no host copies on the GPU path. The current CUDA stream is
      synchronised before the responses leave (DLPack consumers do not follow stream order).
    """

    def __init__(self, pb_utils, args: dict[str, str]):
        self.pb = pb_utils
        self.settings = EngineSettings.from_args(args)
        plan = self.settings.model_dir / "model.plan"
        if self.settings.runtime == "tensorrt" and plan.is_file():
            from craft_export.trt_session import TrtSession  # GPU only; unverified without one (see README)

            self.session = TrtSession(plan, device=self.settings.device, cuda_graphs=self.settings.cuda_graphs)
        else:
            self.session = OrtSession(self.settings.model_dir / "model.onnx", threads=self.settings.threads)
        self._dlpack = self.settings.io == "dlpack"

    def _input(self, name: str, tensor):
        value = from_dlpack(tensor.to_dlpack()) if self._dlpack else tensor.as_numpy()
        rank = self.session.input_ranks.get(name)
        return value if rank is None else from_wire(value, rank)

    def _output(self, name: str, value):
        if self._dlpack:
            return self.pb.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))
        return self.pb.Tensor(name, np.ascontiguousarray(value))

    def _run(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self._dlpack:
            return run_batched(self.session, batches, self.settings.max_batch)
        target = getattr(self.session, "device", "cpu")  # TrtSession: the instance's GPU; OrtSession: host
        results = run_batched(self.session.run_torch, batches, self.settings.max_batch, concat=torch.cat, device=target)
        for device in {v.device for r in results for v in r.values() if v.is_cuda}:
            torch.cuda.current_stream(device).synchronize()  # outputs complete before Triton reads them
        return results

    def execute(self, requests: list[Any]):
        pb = self.pb
        batches, errors = [], {}
        for i, request in enumerate(requests):
            arrays = {}
            for name in self.settings.inputs:
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = self._input(name, tensor)
            missing = [n for n in self.session.input_names if n not in arrays]
            if missing:
                errors[i] = pb.TritonError(f"missing input {missing[0]!r}", pb.TritonError.INVALID_ARG)
            batches.append(arrays)
        ok = [i for i in range(len(requests)) if i not in errors]
        try:
            results = self._run([batches[i] for i in ok])
        except Exception as exc:  # noqa: BLE001 - report to every request of the batch
            return [pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}")) for _ in requests]
        by_index = dict(zip(ok, results))
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb.InferenceResponse(error=errors[i]))
                continue
            out = by_index[i]
            responses.append(pb.InferenceResponse(output_tensors=[self._output(n, out[n]) for n in self.settings.outputs]))
        return responses
