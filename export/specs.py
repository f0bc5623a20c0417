"""The export contract of every network the server runs, as data.

One :class:`NetworkSpec` per network (UNet, text encoder(s), VAE decoder) says which
tensors go in and out, in which dtype and with which dims. The ONNX exporter, the
TensorRT engine builder and the Triton ``config.pbtxt`` writer all read these specs, so
the three can't drift apart.

Dims are ints (static) or strings (symbolic):

* ``"B"``: batch. Always the first axis. Triton batches over it (``max_batch_size > 0``,
  batch dim implicit in ``config.pbtxt``).
* ``"h"``, ``"w"``: latent height and width (pixels // latent_scale).
* ``"<k>*<sym>"``: a multiple of a symbol, e.g. the VAE image is ``("B", 3, "8*h", "8*w")``.

dtypes use Triton's names without the ``TYPE_`` prefix (``"FP32"``, ``"INT64"``...).
:data:`DTYPES` maps them to numpy, torch and ONNX.

Shape profiles (min/opt/max per input, for TensorRT optimisation profiles) come from an
:class:`ImageRange` in pixels and a :class:`BatchRange`.

Importing this module needs neither torch nor onnx. Only the dtype helpers import them,
and the ``config.pbtxt`` helpers use ``tritonclient``'s ``model_config_pb2`` (Triton's
real ``ModelConfig`` protobuf): the writer emits it with ``google.protobuf.text_format``
and the reader parses it back with the same schema, so a malformed config fails loudly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = [
    "DTYPES",
    "ARCHES",
    "KINDS",
    "Dim",
    "TensorSpec",
    "NetworkSpec",
    "ImageRange",
    "BatchRange",
    "ShapeProfile",
    "network_specs",
    "resolve_dim",
    "dim_symbol",
    "config_pbtxt",
    "parse_config_pbtxt",
    "TritonTensor",
    "TritonIO",
    "config_io",
]

Dim = Union[int, str]

ARCHES = ("sd15", "sdxl")
KINDS = ("unet", "text_encoder", "text_encoder_2", "vae_decoder")

# Triton name -> (numpy dtype name, torch dtype name, onnx TensorProto enum value).
# The ONNX enum values are fixed by onnx.proto, written out so onnx isn't needed here.
DTYPES: dict[str, tuple[str | None, str, int]] = {
    "FP32": ("float32", "float32", 1),
    "UINT8": ("uint8", "uint8", 2),
    "INT8": ("int8", "int8", 3),
    "INT16": ("int16", "int16", 5),
    "INT32": ("int32", "int32", 6),
    "INT64": ("int64", "int64", 7),
    "BOOL": ("bool", "bool", 9),
    "FP16": ("float16", "float16", 10),
    "FP64": ("float64", "float64", 11),
    "BF16": (None, "bfloat16", 16),  # numpy has no bfloat16
}
_ONNX_TO_TRITON = {v[2]: k for k, v in DTYPES.items()}

_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SCALED = re.compile(r"^(\d+)\*([A-Za-z_][A-Za-z0-9_]*)$")


def _check_dim(d: Dim) -> None:
    if isinstance(d, bool) or not isinstance(d, (int, str)):
        raise TypeError(f"dim must be int or str, got {d!r}")
    if isinstance(d, int) and d < 1:
        raise ValueError(f"static dim must be >= 1, got {d}")
    if isinstance(d, str) and not (_SYMBOL.match(d) or _SCALED.match(d)):
        raise ValueError(f"symbolic dim must be a name or '<int>*<name>', got {d!r}")


def dim_symbol(d: Dim) -> str | None:
    """The symbol a dim refers to (``"8*h"`` -> ``"h"``), None for a static dim."""
    if isinstance(d, int):
        return None
    m = _SCALED.match(d)
    return m.group(2) if m else d


def resolve_dim(d: Dim, env: Mapping[str, int]) -> int:
    """Concrete size of a dim given symbol values, e.g. ``resolve_dim("8*h", {"h": 12}) == 96``."""
    if isinstance(d, int):
        return d
    m = _SCALED.match(d)
    if m:
        return int(m.group(1)) * int(env[m.group(2)])
    return int(env[d])


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: Triton dtype name and dims (int static, str symbolic)."""

    name: str
    dtype: str
    dims: tuple[Dim, ...]

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: unknown dtype {self.dtype!r}; one of {sorted(DTYPES)}")
        object.__setattr__(self, "dims", tuple(self.dims))
        for d in self.dims:
            _check_dim(d)

    # ---- dtype views ----------------------------------------------------------------
    @property
    def triton_dtype(self) -> str:
        """``"TYPE_FP32"`` etc., as written in ``config.pbtxt``."""
        return f"TYPE_{self.dtype}"

    @property
    def numpy_dtype(self):
        import numpy as np

        name = DTYPES[self.dtype][0]
        if name is None:
            raise TypeError(f"{self.name}: {self.dtype} has no numpy dtype")
        return np.dtype(name)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, DTYPES[self.dtype][1])

    @property
    def onnx_dtype(self) -> int:
        """``onnx.TensorProto`` element type (FLOAT = 1, INT64 = 7, ...)."""
        return DTYPES[self.dtype][2]

    # ---- dims -----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def batched(self) -> bool:
        return bool(self.dims) and self.dims[0] == "B"

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(s for s in (dim_symbol(d) for d in self.dims) if s is not None)

    def dynamic_axes(self) -> dict[int, str]:
        """Axis -> dim string for every symbolic axis (the legacy exporter's ``dynamic_axes``)."""
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def shape(self, env: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(resolve_dim(d, env) for d in self.dims)

    def triton_dims(self) -> list[int]:
        """Dims as written in ``config.pbtxt``: batch dropped, -1 for every symbolic axis."""
        dims = self.dims[1:] if self.batched else self.dims
        return [d if isinstance(d, int) else -1 for d in dims]

    @staticmethod
    def from_onnx_dtype(elem_type: int) -> str:
        try:
            return _ONNX_TO_TRITON[elem_type]
        except KeyError:
            raise ValueError(f"ONNX element type {elem_type} has no Triton name here") from None


@dataclass(frozen=True)
class ShapeProfile:
    """min / opt / max shape of one input (a TensorRT optimisation profile entry)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BatchRange:
    min: int = 1
    opt: int = 1
    max: int = 8

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class ImageRange:
    """Image sizes in pixels, (height, width) each; multiples of ``multiple`` (the latent scale)."""

    min_hw: tuple[int, int] = (256, 256)
    opt_hw: tuple[int, int] = (512, 512)
    max_hw: tuple[int, int] = (1024, 1024)
    multiple: int = 8

    def __post_init__(self):
        for name in ("min_hw", "opt_hw", "max_hw"):
            hw = tuple(int(x) for x in getattr(self, name))
            if len(hw) != 2 or any(x < self.multiple or x % self.multiple for x in hw):
                raise ValueError(f"{name}={hw}: need (height, width), each a positive multiple of {self.multiple}")
            object.__setattr__(self, name, hw)
        for i in range(2):
            if not self.min_hw[i] <= self.opt_hw[i] <= self.max_hw[i]:
                raise ValueError(f"need min_hw <= opt_hw <= max_hw per axis, got {self}")

    @classmethod
    def default(cls, arch: str) -> "ImageRange":
        """SD 1.5: 256..1024 px around 512; SDXL: 512..1536 px around 1024 (covers its aspect buckets)."""
        if arch == "sd15":
            return cls((256, 256), (512, 512), (1024, 1024))
        if arch == "sdxl":
            return cls((512, 512), (1024, 1024), (1536, 1536))
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")


@dataclass(frozen=True)
class NetworkSpec:
    """Inputs and outputs of one exported network, in call order.

    ``meta`` carries facts the contract depends on but that aren't tensors (vocab size,
    token ids, latent scale, ...); it is excluded from equality and hashing.
    """

    kind: str
    arch: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int = 8
    latent_scale: int = 8
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.kind}: duplicate tensor names in {names}")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        in_symbols = {s for t in self.inputs for s in t.symbols}
        for t in self.inputs:
            if any(isinstance(d, str) and not _SYMBOL.match(d) for d in t.dims):
                raise ValueError(f"{self.kind}.{t.name}: input dims must be plain symbols, got {t.dims}")
        for t in self.outputs:
            missing = set(t.symbols) - in_symbols
            if missing:
                raise ValueError(f"{self.kind}.{t.name}: output symbols {missing} not bound by any input")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.kind} has no tensor {name!r}")

    @property
    def symbols(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for t in self.inputs:
            for s in t.symbols:
                seen.setdefault(s)
        return tuple(seen)

    @property
    def spatial(self) -> bool:
        """Whether the network has latent-size axes (UNet, VAE) or not (text encoders)."""
        return any(s in ("h", "w") for s in self.symbols)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``dynamic_axes`` for ``torch.onnx.export(dynamo=False)``: inputs and outputs."""
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """``dynamic_shapes`` for ``torch.onnx.export(dynamo=True)``: inputs only, by name."""
        return {t.name: t.dynamic_axes() for t in self.inputs}

    def env(self, batch: int, hw: tuple[int, int] | None = None) -> dict[str, int]:
        """Symbol values for a batch size and an image size in pixels."""
        env = {"B": int(batch)}
        if hw is not None:
            h, w = hw
            if h % self.latent_scale or w % self.latent_scale:
                raise ValueError(f"image size {hw} is not a multiple of {self.latent_scale}")
            env.update(h=h // self.latent_scale, w=w // self.latent_scale)
        elif self.spatial:
            raise ValueError(f"{self.kind} needs an image size")
        return env

    def input_shapes(self, batch: int, hw: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
        env = self.env(batch, hw)
        return {t.name: t.shape(env) for t in self.inputs}

    def output_shapes(self, env: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(env) for t in self.outputs}

    def bind(self, shapes: Mapping[str, Iterable[int]]) -> dict[str, int]:
        """Check concrete input shapes against the spec; return the symbol values they bind."""
        env: dict[str, int] = {}
        if set(shapes) != set(self.input_names):
            raise ValueError(f"{self.kind}: inputs {sorted(shapes)} != spec {self.input_names}")
        for t in self.inputs:
            shape = tuple(int(x) for x in shapes[t.name])
            if len(shape) != t.rank:
                raise ValueError(f"{self.kind}.{t.name}: rank {len(shape)} != spec {t.dims}")
            for d, n in zip(t.dims, shape):
                if isinstance(d, int):
                    if d != n:
                        raise ValueError(f"{self.kind}.{t.name}: shape {shape} != spec {t.dims}")
                elif env.setdefault(d, n) != n:
                    raise ValueError(f"{self.kind}.{t.name}: {d}={n} but another input has {d}={env[d]}")
        return env

    def profile(self, image_range: ImageRange | None = None,
                batch: BatchRange | None = None) -> dict[str, ShapeProfile]:
        """min/opt/max shape of every input, e.g. for a TensorRT optimisation profile."""
        batch = batch or BatchRange(1, 1, self.max_batch)
        if batch.max > self.max_batch:
            raise ValueError(f"batch max {batch.max} > spec max_batch {self.max_batch}")
        image_range = image_range or ImageRange.default(self.arch)
        if image_range.multiple % self.latent_scale:
            raise ValueError(f"image multiple {image_range.multiple} is not a multiple of {self.latent_scale}")
        envs = [self.env(b, hw if self.spatial else None) for b, hw in (
            (batch.min, image_range.min_hw), (batch.opt, image_range.opt_hw), (batch.max, image_range.max_hw))]
        return {t.name: ShapeProfile(*(t.shape(e) for e in envs)) for t in self.inputs}


# ---------------------------------------------------------------------------------------
# network_specs: derive every network's contract from the model configs
# ---------------------------------------------------------------------------------------

def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config not found: {path}") from None


def _configs_from(source: Any, arch: str) -> dict[str, Any]:
    """{"unet", "vae", "text_encoder", "text_encoder_2"} -> config (dict or config object)."""
    names = ["text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    if isinstance(source, (str, Path)):
        root = Path(source)
        return {"unet": _read_json(root / "unet" / "config.json"),
                "vae": _read_json(root / "vae" / "config.json"),
                **{n: _read_json(root / n / "config.json") for n in names}}
    if isinstance(source, Mapping):
        return dict(source)
    # a loaded pipeline (diffusers pipeline or craft_export.loading.PipelineParts)
    out = {"unet": source.unet.config, "vae": source.vae.config}
    encoders = getattr(source, "text_encoders", None)
    if encoders is None:
        encoders = [getattr(source, n) for n in names]
    for n, enc in zip(names, encoders):
        out[n] = enc.config
    return out


def network_specs(arch: str, source: Any, *, max_batch: int = 8) -> dict[str, NetworkSpec]:
    """The spec of every network of an ``sd15`` / ``sdxl`` pipeline, keyed by kind.

    ``source`` is a diffusers pipeline folder, a loaded pipeline (anything with ``.unet``,
    ``.vae`` and ``.text_encoders`` or ``.text_encoder[_2]``), or a mapping of configs
    ``{"unet": ..., "vae": ..., "text_encoder": ..., "text_encoder_2": ...}``. Widths come
    from the configs: context width D = UNet ``cross_attention_dim`` (checked against the
    text encoders' hidden sizes), pooled width P = ``projection_class_embeddings_input_dim
    - n_time_ids * addition_time_embed_dim`` (checked against ``text_encoder_2``'s
    ``projection_dim``), sequence length = the encoders' ``max_position_embeddings``.
    """
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    cfgs = _configs_from(source, arch)
    unet, vae = cfgs["unet"], cfgs["vae"]
    is_sdxl = _get(unet, "addition_embed_type") == "text_time"
    if is_sdxl != (arch == "sdxl"):
        raise ValueError(f"UNet config is {'SDXL' if is_sdxl else 'not SDXL'} "
                         f"(addition_embed_type={_get(unet, 'addition_embed_type')!r}) but arch={arch!r}")

    latent_scale = 2 ** (len(_get(vae, "block_out_channels")) - 1)
    latent_ch = int(_get(vae, "latent_channels", 4))
    unet_in, unet_out = int(_get(unet, "in_channels")), int(_get(unet, "out_channels"))
    if unet_in != latent_ch:
        raise ValueError(f"UNet in_channels {unet_in} != VAE latent_channels {latent_ch}")
    D = _get(unet, "cross_attention_dim")
    if not isinstance(D, int):
        raise ValueError(f"per-block cross_attention_dim {D!r} is not supported")

    enc_names = ["text_encoder"] + (["text_encoder_2"] if is_sdxl else [])
    encs = [cfgs.get(n) for n in enc_names]
    seq = {int(_get(e, "max_position_embeddings", 77)) for e in encs if e is not None} or {77}
    if len(seq) != 1:
        raise ValueError(f"text encoders disagree on sequence length: {seq}")
    L = seq.pop()
    widths = [_get(e, "hidden_size") for e in encs]
    if all(w is not None for w in widths) and sum(widths) != D:
        raise ValueError(f"text encoder widths {widths} don't add up to UNet cross_attention_dim {D}")

    common = dict(arch=arch, max_batch=max_batch, latent_scale=latent_scale)
    specs: dict[str, NetworkSpec] = {}

    unet_inputs = [
        TensorSpec("sample", "FP32", ("B", unet_in, "h", "w")),
        TensorSpec("timestep", "FP32", ("B",)),
        TensorSpec("encoder_hidden_states", "FP32", ("B", L, D)),
    ]
    unet_meta: dict[str, Any] = {"num_upsamplers": len(_get(unet, "up_block_types")) - 1}
    if is_sdxl:
        time_dim = int(_get(unet, "addition_time_embed_dim"))
        proj_in = int(_get(unet, "projection_class_embeddings_input_dim"))
        te2 = cfgs.get("text_encoder_2")
        P = _get(te2, "projection_dim")
        if P is None:
            n_time_ids = 6
            P = proj_in - n_time_ids * time_dim
        else:
            P = int(P)
            n_time_ids, rem = divmod(proj_in - P, time_dim)
            if rem or n_time_ids < 1:
                raise ValueError(f"projection_class_embeddings_input_dim {proj_in} != "
                                 f"text_encoder_2.projection_dim {P} + n * addition_time_embed_dim {time_dim}")
        unet_inputs += [TensorSpec("text_embeds", "FP32", ("B", P)),
                        TensorSpec("time_ids", "FP32", ("B", n_time_ids))]
        unet_meta.update(pooled_dim=P, n_time_ids=n_time_ids)
    specs["unet"] = NetworkSpec("unet", inputs=tuple(unet_inputs),
                                outputs=(TensorSpec("noise_pred", "FP32", ("B", unet_out, "h", "w")),),
                                meta=unet_meta, **common)

    for i, (name, enc) in enumerate(zip(enc_names, encs)):
        if enc is None:
            raise ValueError(f"{arch} needs a {name} config")
        width = int(_get(enc, "hidden_size"))
        outputs = [TensorSpec("hidden_states", "FP32", ("B", L, width))]
        pooled = is_sdxl and i == 1
        if pooled:
            outputs.append(TensorSpec("text_embeds", "FP32", ("B", int(_get(enc, "projection_dim")))))
        meta = {"vocab_size": int(_get(enc, "vocab_size")),
                "bos_token_id": _get(enc, "bos_token_id"), "eos_token_id": _get(enc, "eos_token_id"),
                "pad_token_id": _get(enc, "pad_token_id"),
                "penultimate": is_sdxl, "pooled": pooled}
        specs[name] = NetworkSpec(name, inputs=(TensorSpec("input_ids", "INT64", ("B", L)),),
                                  outputs=tuple(outputs), meta=meta, **common)

    out_ch = int(_get(vae, "out_channels", 3))
    specs["vae_decoder"] = NetworkSpec(
        "vae_decoder",
        inputs=(TensorSpec("latent", "FP32", ("B", latent_ch, "h", "w")),),
        outputs=(TensorSpec("image", "FP32", ("B", out_ch, f"{latent_scale}*h", f"{latent_scale}*w")),),
        meta={"scaling_factor": float(_get(vae, "scaling_factor", 0.18215))}, **common)
    return specs


# ---------------------------------------------------------------------------------------
# Triton config.pbtxt
# ---------------------------------------------------------------------------------------

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

    def fill(entry, t: TensorSpec) -> None:
        entry.name = t.name
        entry.data_type = pb.DataType.Value(t.triton_dtype)
        dims = t.triton_dims()
        if dims:
            entry.dims.extend(dims)
        else:
            entry.dims.append(1)
            entry.reshape.SetInParent()  # reshape { } == shape: [] -> per-item scalar

    for t in spec.inputs:
        fill(cfg.input.add(), t)
    for t in spec.outputs:
        fill(cfg.output.add(), t)
    group = cfg.instance_group.add()
    group.count = int(instance_count)
    group.kind = pb.ModelInstanceGroup.Kind.Value(instance_kind)
    if dynamic_batching:
        cfg.dynamic_batching.SetInParent()
        if max_queue_delay_us is not None:
            cfg.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    for key, value in (parameters or {}).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        cfg.parameters[str(key)].string_value = str(value)

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
