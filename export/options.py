"""What ``craft export`` is asked to do (:class:`ExportOptions`) and its units of work (:class:`ModelJob`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the CLI reads the choices here without importing torch
    from craft_ops.aggregate import Variant

log = logging.getLogger(__name__)

__all__ = ["RUNTIMES", "PRECISIONS", "RUNNERS", "LORA_MODES", "ExportError", "ExportOptions", "ModelJob", "ExportReport",
           "check_runtime"]

RUNTIMES = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")
RUNNERS = ("auto", "native", "python")
LORA_MODES = ("baked", "runtime")


class ExportError(ValueError):
    """An export that cannot proceed; nothing in the repository was changed."""


@dataclass(frozen=True)
class ExportOptions:
    recipe: Path
    out: Path
    runtime: str = "onnxruntime"  # or "tensorrt"
    precision: str = "fp32"
    pairs: str | None = None  # None: "all" in baked mode, "none" (no hot pairs) in runtime mode
    runner: str = "auto"  # "native" | "python" | "auto"
    # TensorRT: keep the UNet variants' ONNX files after their engines are built and checked. By
    # default only W_init's stays (later variants are derived from it): a full-size SDXL variant
    # is 10 GB of fp32 ONNX that nothing serves.
    keep_onnx: bool = False
    # Folders every path of the recipe must resolve into (symlinks and ``..`` followed); empty: anywhere
    # the process may read (a recipe is operator configuration, README "Recipes").
    confine_to: tuple[Path, ...] = ()
    # "baked": every variant an engine (fused weights). "runtime": one runtime-LoRA UNet network per base
    # whose routed modules take LoRA factors and gates as inputs, plus factor files (README "Runtime LoRA").
    lora_mode: str = "baked"
    max_rank: int = 64  # runtime mode: the rank every factor is zero-padded to (a LoRA above it is refused)
    # Peak resident memory per export phase in the report (:mod:`craft_export.memory`; resets the
    # process's VmHWM at each phase boundary, so off unless asked for).
    memory_phases: bool = False

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ExportError(f"--runtime must be onnxruntime or tensorrt, got {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.runner not in RUNNERS:
            raise ExportError(f"--runner must be auto, native or python, got {self.runner!r}")
        if self.lora_mode not in LORA_MODES:
            raise ExportError(f"--lora-mode must be baked or runtime, got {self.lora_mode!r}")
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or not 1 <= self.max_rank <= 1024:
            raise ExportError(f"--max-rank must be an integer in [1, 1024], got {self.max_rank!r}")
        if self.pairs is None:
            object.__setattr__(self, "pairs", "all" if self.lora_mode == "baked" else "none")


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
    loras: dict[str, list[str]] = field(default_factory=dict)  # runtime mode: factor files "written" / "kept"
    fast_path: bool = False  # runtime mode: LoRAs registered without loading the base (no network rebuilt)
    memory: dict | None = None  # --memory-phases: :meth:`craft_export.memory.PhasePeaks.summary`

    def summary(self) -> dict:
        out = {"built": self.built, "reused": self.reused, "removed": self.removed, "seconds": round(self.seconds, 3)}
        if self.loras:
            out.update(loras=self.loras, fast_path=self.fast_path)
        if self.memory is not None:
            out["memory"] = self.memory
        return out


def check_runtime(options: ExportOptions) -> None:
    """Refuse a runtime this machine cannot build for (TensorRT: :func:`.tensorrt_build.check_tensorrt_available`)."""
    if options.runtime != "tensorrt":
        if options.precision != "fp32":
            log.warning("--precision %s with onnxruntime on CPU: exporting fp32 weights (DESIGN-NOTES 9)", options.precision)
        return
    from .tensorrt_build import check_tensorrt_available

    check_tensorrt_available()
