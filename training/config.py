"""Training settings as frozen dataclasses, validated once (``craft train-backbone``, ``craft train-lora``).

Imports neither torch nor the trainers, so the CLI reads the defaults from here cheaply.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ATTENTION_SUFFIXES", "MIXED_PRECISIONS", "TrainError", "check_positive", "check_resolution",
           "BackboneConfig", "LoraTrainConfig", "RANKFT_OBJECTIVES"]

MIXED_PRECISIONS = ("no", "fp16", "bf16")  # UNet compute dtype: fp32, or fp16 / bf16 on a CUDA GPU

# Attention projections of every transformer block: the layers Rank-FT projects and LoRAs adapt.
ATTENTION_SUFFIXES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
)


class TrainError(ValueError):
    """Bad training input; the message names the flag or the path."""


def check_positive(value: float, flag: str, *, integer: bool = True) -> None:
    """Refuse ``value <= 0`` (and non-integers / non-finite numbers) for ``flag``."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise TrainError(f"{flag} must be an integer, got {value!r}")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise TrainError(f"{flag} must be positive, got {value!r}")


def check_resolution(resolution: int, flag: str = "--resolution") -> None:
    """The resolution must be a positive multiple of 8 (the VAE downsamples by 8)."""
    check_positive(resolution, flag)
    if resolution % 8:
        raise TrainError(f"{flag} must be a multiple of 8, got {resolution}")


RANKFT_OBJECTIVES = ("denoise", "preserve")


@dataclass(frozen=True)
class BackboneConfig:
    """Settings of one Rank-FT run (``craft train-backbone``), validated once."""

    base: Path
    content_images: Path
    style_images: Path
    out: Path
    r_max: int = 128
    r_min: int = 4
    steps: int = 500
    lr: float = 1e-3
    resolution: int = 512
    sigma: float = 0.35
    batch_size: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 100  # 0: only at the end
    resume: bool = False
    lambda_orth: float = 0.1
    eval_pairs: int = 4
    eval_timesteps: int = 4
    evaluate: bool = True
    targets: tuple[str, ...] = ATTENTION_SUFFIXES
    objective: str = "denoise"  # see craft_training.backbone: "denoise" | "preserve"

    def __post_init__(self) -> None:
        if self.objective not in RANKFT_OBJECTIVES:
            raise TrainError(f"--objective must be one of {list(RANKFT_OBJECTIVES)}, got {self.objective!r}")
        for name in ("base", "content_images", "style_images", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        check_positive(self.r_max, "--r-max")
        check_positive(self.r_min, "--r-min")
        if self.r_min > self.r_max:
            raise TrainError(f"--r-min ({self.r_min}) must not exceed --r-max ({self.r_max})")
        check_positive(self.steps, "--steps")
        check_positive(self.lr, "--lr", integer=False)
        check_resolution(self.resolution)
        check_positive(self.sigma, "--sigma", integer=False)
        check_positive(self.batch_size, "--batch-size")
        every = self.checkpoint_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise TrainError(f"--checkpoint-every must be an integer >= 0, got {self.checkpoint_every!r}")
        if not math.isfinite(self.lambda_orth) or self.lambda_orth < 0:
            raise TrainError(f"lambda_orth must be a finite number >= 0, got {self.lambda_orth!r}")
        check_positive(self.eval_pairs, "eval_pairs")
        check_positive(self.eval_timesteps, "eval_timesteps")

    def fingerprint(self) -> dict:
        """The settings a checkpoint must share with a run that resumes it."""
        skip = {"out", "steps", "checkpoint_every", "resume", "evaluate"}
        data = {k: v for k, v in asdict(self).items() if k not in skip}
        return json.loads(json.dumps(data, default=lambda v: str(Path(v).resolve())))


@dataclass(frozen=True)
class LoraTrainConfig:
    """Settings of one LoRA run (``craft train-lora``), validated once."""

    base: Path
    images: Path
    kind: str
    prompt: str
    out: Path
    backbone: Path | None = None
    rank: int = 64
    alpha: float | None = None  # default: rank (scale 1)
    steps: int = 1000
    lr: float = 1e-4
    resolution: int = 512
    routing: str | None = None
    mixed_precision: str = "no"
    seed: int = 0
    batch_size: int = 1
    weight_decay: float = 1e-2
    targets: tuple[str, ...] = ATTENTION_SUFFIXES

    def __post_init__(self) -> None:
        for name in ("base", "images", "out", "backbone"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else Path(value))
        if self.kind not in ("content", "style"):
            raise TrainError(f"--kind must be 'content' or 'style', got {self.kind!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise TrainError(f"--prompt must be a non-empty string, got {self.prompt!r}")
        check_positive(self.rank, "--rank")
        if self.alpha is not None:
            check_positive(self.alpha, "alpha", integer=False)
        check_positive(self.steps, "--steps")
        check_positive(self.lr, "--lr", integer=False)
        check_resolution(self.resolution)
        check_positive(self.batch_size, "batch_size")
        if self.out.suffix.lower() != ".safetensors":
            raise TrainError(f"--out must be a .safetensors file, got {self.out}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)
