"""What ``craft export`` is asked to do (:class:`ExportOptions`) and its units of work (:class:`ModelJob`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the CLI reads the choices here without importing torch
    from craft_ops.aggregate import Variant

__all__ = ["RUNTIMES", "PRECISIONS", "RUNNERS", "ExportError", "ExportOptions", "ModelJob", "ExportReport"]

RUNTIMES = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")
RUNNERS = ("auto", "native", "python")


class ExportError(ValueError):
    """An export that cannot proceed; nothing in the repository was changed."""


@dataclass(frozen=True)
class ExportOptions:
    recipe: Path
    out: Path
    runtime: str = "onnxruntime"  # or "tensorrt"
    precision: str = "fp32"
    pairs: str = "all"
    runner: str = "auto"  # "native" | "python" | "auto"
    # TensorRT: keep the UNet variants' ONNX files after their engines are built and checked. By
    # default only W_init's stays (later variants are derived from it): a full-size SDXL variant
    # is 10 GB of fp32 ONNX that nothing serves.
    keep_onnx: bool = False
    # Folders every path of the recipe must resolve into (symlinks and ``..`` followed); empty: anywhere
    # the process may read (a recipe is operator configuration, README "Recipes").
    confine_to: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ExportError(f"--runtime must be onnxruntime or tensorrt, got {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.runner not in RUNNERS:
            raise ExportError(f"--runner must be auto, native or python, got {self.runner!r}")


@dataclass(frozen=True)
class ModelJob:
    """One Triton model to have in the repository."""

    name: str
    network: str  # "unet" | "text_encoder" | "text_encoder_2" | "vae_decoder"
    key: str
    variants: tuple[Variant, ...] = ()

    @property
    def is_variant(self) -> bool:
        """A UNet with LoRA weights baked in (derived from / refitted on the W_init UNet)."""
        return self.network == "unet" and not self.variants[0].is_base

    @property
    def is_base_unet(self) -> bool:
        return self.network == "unet" and self.variants[0].is_base


@dataclass
class ExportReport:
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"built": self.built, "reused": self.reused, "removed": self.removed, "seconds": round(self.seconds, 3)}
