"""Triton ``config.pbtxt``: the one writer (engine models and pipeline models) and its reader.

Both use ``tritonclient``'s ``model_config_pb2`` (Triton's real ``ModelConfig`` protobuf): the
writer emits it with ``google.protobuf.text_format`` and the reader parses it back with the same
schema, so a malformed config fails loudly. Engine models are written from a
:class:`~craft_export.specs.NetworkSpec`, the pipeline models from the request schema
(:mod:`craft_client.schema`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft_client.schema import DTYPES, REQUEST_INPUTS, RESPONSE_OUTPUTS, STREAM_OUTPUTS

from .specs import NetworkSpec

__all__ = ["config_pbtxt", "pipeline_config", "parse_config_pbtxt", "TritonTensor", "TritonIO", "config_io"]

_PLATFORMS = ("onnxruntime", "tensorrt_plan", "python")
_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO", "KIND_MODEL")


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def config_pbtxt(
    model_name: str,
    spec: NetworkSpec,
    platform: str = "onnxruntime",
    max_batch_size: int | None = None,
    instance_kind: str | None = None,
    dynamic_batching: bool = False,
    parameters: Mapping[str, Any] | None = None,
    *,
    instance_count: int = 1,
    max_queue_delay_us: int | None = None,
) -> str:
    """A Triton ``config.pbtxt`` for ``spec`` served by ``platform``.

    Batching is implicit (``max_batch_size > 0``): every tensor's first dim must be ``B``
    and ``dims`` list the rest, -1 for dynamic axes. A tensor that is just ``(B,)`` (the
    UNet timestep) is written as ``dims: [1]`` with ``reshape { shape: [] }``, Triton's
    documented form for a per-item scalar. ``platform``: ``"onnxruntime"`` (backend
    onnxruntime, ``model.onnx``), ``"tensorrt_plan"`` (``model.plan``, GPU only) or
    ``"python"`` (backend python, ``model.py``). ``instance_kind`` defaults to KIND_GPU for
    TensorRT and KIND_CPU otherwise. ``parameters`` values are written as strings.
    """
    pb = _pb()
    if platform not in _PLATFORMS:
        raise ValueError(f"platform must be one of {_PLATFORMS}, got {platform!r}")
    if instance_kind is None:
        instance_kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
    if instance_kind not in _KINDS:
        raise ValueError(f"instance_kind must be one of {_KINDS}, got {instance_kind!r}")
    if platform == "tensorrt_plan" and instance_kind == "KIND_CPU":
        raise ValueError("TensorRT plans run on GPU instances only")
    max_batch_size = spec.max_batch if max_batch_size is None else int(max_batch_size)
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be > 0: every network here batches over its first dim")
    if max_batch_size > spec.max_batch:
        raise ValueError(f"max_batch_size {max_batch_size} > spec.max_batch {spec.max_batch}")
    unbatched = [t.name for t in spec.inputs + spec.outputs if not t.batched]
    if unbatched:
        raise ValueError(f"{spec.kind}: tensors {unbatched} don't start with the batch dim 'B'")

    cfg = pb.ModelConfig(name=model_name, max_batch_size=max_batch_size)
    if platform == "onnxruntime":
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = "model.onnx"
    elif platform == "tensorrt_plan":
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
    else:
        cfg.backend = "python"

    for entry, specs in ((cfg.input, spec.inputs), (cfg.output, spec.outputs)):
        for t in specs:
            dims = t.triton_dims()
            # a tensor that is just (B,) (the UNet timestep) is a per-item scalar: dims [1], reshape { }
            _tensor(entry.add(), t.name, t.dtype, dims or [1], scalar=not dims)
    _instances(cfg, instance_count, instance_kind)
    if dynamic_batching:
        cfg.dynamic_batching.SetInParent()
        if max_queue_delay_us is not None:
            cfg.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    _parameters(cfg, parameters or {})
    return _text(cfg)


def pipeline_config(name: str, *, streaming: bool, instances: int = 4, workers: int = 4) -> str:
    """``config.pbtxt`` of a pipeline model (Python backend, no batching), from the request schema.

    ``streaming``: the decoupled twin (progress messages, one instance; its requests run
    concurrently on ``workers`` threads).
    """
    pb = _pb()
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    for inp, (dtype, dims, required) in REQUEST_INPUTS.items():
        _tensor(cfg.input.add(), inp, dtype, dims, optional=not required)
    outputs = {**RESPONSE_OUTPUTS, **(STREAM_OUTPUTS if streaming else {})}
    for out, (dtype, dims) in outputs.items():
        _tensor(cfg.output.add(), out, dtype, dims)
    if streaming:
        cfg.model_transaction_policy.decoupled = True
    _instances(cfg, 1 if streaming else instances, "KIND_CPU")
    _parameters(cfg, {"workers": workers})
    return _text(cfg)


def _tensor(entry, name: str, dtype: str, dims, *, scalar: bool = False, optional: bool = False) -> None:
    entry.name = name
    entry.data_type = _pb().DataType.Value(DTYPES[dtype].config)
    entry.dims.extend(int(d) for d in dims)
    if scalar:
        entry.reshape.SetInParent()  # reshape { } == shape: [] -> what the model sees has no item dims
    if optional:
        entry.optional = True


def _instances(cfg, count: int, kind: str) -> None:
    group = cfg.instance_group.add()
    group.count = int(count)
    group.kind = _pb().ModelInstanceGroup.Kind.Value(kind)


def _parameters(cfg, parameters: Mapping[str, Any]) -> None:
    for key, value in parameters.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        cfg.parameters[str(key)].string_value = str(value)


def _text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_config_pbtxt(text_or_path: str | Path):
    """Parse a ``config.pbtxt`` (text, or a path to one) into Triton's ``ModelConfig`` protobuf."""
    from google.protobuf import text_format

    if isinstance(text_or_path, Path):
        text = text_or_path.read_text()
    elif "\n" not in text_or_path and text_or_path.endswith(".pbtxt") and Path(text_or_path).is_file():
        text = Path(text_or_path).read_text()
    else:
        text = text_or_path
    return text_format.Parse(text, _pb().ModelConfig())


@dataclass(frozen=True)
class TritonTensor:
    """One tensor of a parsed config: dims as written, and the shape the model itself sees."""

    name: str
    dtype: str  # "FP32", ...
    dims: tuple[int, ...]  # as in config.pbtxt (batch excluded)
    model_shape: tuple[int, ...]  # reshape applied, batch prepended as -1 when batching


@dataclass(frozen=True)
class TritonIO:
    name: str
    backend: str
    platform: str
    max_batch_size: int
    default_model_filename: str
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    instance_kinds: tuple[str, ...]
    dynamic_batching: bool
    parameters: dict[str, str]


def config_io(config: Any) -> TritonIO:
    """Read back names / dtypes / dims of a ``config.pbtxt`` (text, path or ``ModelConfig``)."""
    pb = _pb()
    cfg = config if isinstance(config, pb.ModelConfig) else parse_config_pbtxt(config)

    def tensor(entry) -> TritonTensor:
        dtype = pb.DataType.Name(entry.data_type).removeprefix("TYPE_")
        dims = tuple(int(d) for d in entry.dims)
        shape = tuple(int(d) for d in entry.reshape.shape) if entry.HasField("reshape") else dims
        if cfg.max_batch_size > 0:
            shape = (-1,) + shape
        return TritonTensor(entry.name, dtype, dims, shape)

    return TritonIO(
        name=cfg.name, backend=cfg.backend, platform=cfg.platform,
        max_batch_size=cfg.max_batch_size, default_model_filename=cfg.default_model_filename,
        inputs=tuple(tensor(e) for e in cfg.input), outputs=tuple(tensor(e) for e in cfg.output),
        instance_kinds=tuple(pb.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group),
        dynamic_batching=cfg.HasField("dynamic_batching"),
        parameters={k: v.string_value for k, v in cfg.parameters.items()},
    )
