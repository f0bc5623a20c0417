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

dtypes use Triton's names (``"FP32"``, ``"INT64"``...); the one dtype table,
:data:`craft_client.schema.DTYPES`, maps them to numpy, torch, ONNX and TensorRT.

Shape profiles (min/opt/max per input, for TensorRT optimisation profiles) come from an
:class:`ImageRange` in pixels and a :class:`BatchRange`. The specs of a pipeline's networks
are derived from its configs by :func:`craft_export.network_specs.network_specs`; the
``config.pbtxt`` writer is :mod:`craft_export.triton_config`.

Importing this module needs neither torch nor onnx; only the dtype helpers import them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from craft_client.schema import DTYPES

__all__ = [
    "ARCHES",
    "KINDS",
    "Dim",
    "TensorSpec",
    "NetworkSpec",
    "ImageRange",
    "BatchRange",
    "ShapeProfile",
    "resolve_dim",
    "dim_symbol",
]

Dim = Union[int, str]

ARCHES = ("sd15", "sdxl")
KINDS = ("unet", "text_encoder", "text_encoder_2", "vae_decoder", "unet_lora")  # unet_lora: runtime-LoRA UNet

_ONNX_TO_TRITON = {d.onnx: d.name for d in DTYPES.values()}

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
        return DTYPES[self.dtype].config

    @property
    def numpy_dtype(self):
        import numpy as np

        name = DTYPES[self.dtype].numpy
        if name is None:
            raise TypeError(f"{self.name}: {self.dtype} has no numpy dtype")
        return np.dtype(name)

    @property
    def torch_dtype(self):
        import torch

        name = DTYPES[self.dtype].torch
        if name is None:
            raise TypeError(f"{self.name}: {self.dtype} has no torch dtype")
        return getattr(torch, name)

    @property
    def onnx_dtype(self) -> int:
        """``onnx.TensorProto`` element type (FLOAT = 1, INT64 = 7, ...)."""
        return DTYPES[self.dtype].onnx

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

    def profile(self, image_range: ImageRange | None = None, batch: BatchRange | None = None,
                symbols: Mapping[str, BatchRange] | None = None) -> dict[str, ShapeProfile]:
        """min/opt/max shape of every input, e.g. for a TensorRT optimisation profile.

        ``symbols``: min/opt/max of symbols other than batch and latent size (the runtime-LoRA
        network's bank slots ``S``: :func:`craft_export.trt_policy.profile_slots`).
        """
        batch = batch or BatchRange(1, 1, self.max_batch)
        if batch.max > self.max_batch:
            raise ValueError(f"batch max {batch.max} > spec max_batch {self.max_batch}")
        image_range = image_range or ImageRange.default(self.arch)
        if image_range.multiple % self.latent_scale:
            raise ValueError(f"image multiple {image_range.multiple} is not a multiple of {self.latent_scale}")
        envs = [self.env(b, hw if self.spatial else None) for b, hw in (
            (batch.min, image_range.min_hw), (batch.opt, image_range.opt_hw), (batch.max, image_range.max_hw))]
        for name, r in (symbols or {}).items():
            for env, n in zip(envs, (r.min, r.opt, r.max)):
                env[name] = int(n)
        return {t.name: ShapeProfile(*(t.shape(e) for e in envs)) for t in self.inputs}
