"""Training shared by Rank-FT (``craft train-backbone``) and LoRA training (``craft train-lora``).

The two trainers live in :mod:`craft_training.backbone` (CRAFT-LoRA Eq. 1-4) and
:mod:`craft_training.lora` (Eq. 6-7); this module holds what both need: image folders,
device and precision, the DDPM noise schedule, one-time VAE / text encoding and the
denoising loss. It imports neither trainer.

Conventions: images are read with PIL (PNG / JPEG), center-cropped to a square and resized
to ``resolution``; pixels live in ``[-1, 1]``. Latents are the VAE posterior *mean* times
the VAE scaling factor (deterministic). Randomness comes from explicit CPU generators, so a
seed fixes a run bit for bit on one machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import MIXED_PRECISIONS, TrainError

__all__ = [
    "IMAGE_SUFFIXES",
    "list_images",
    "load_image",
    "load_images",
    "training_device",
    "compute_dtype",
    "frozen_unet",
    "NoiseSchedule",
    "encode_latents",
    "encode_prompt",
    "batch_cond",
    "prediction",
    "denoising_loss",
    "epoch_order",
    "Progress",
]

# ``progress(done, total, losses)`` after every optimiser step (the CLI draws a bar with it)
Progress = Callable[[int, int, Mapping[str, float]], None]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# -- images ------------------------------------------------------------------------------------


def list_images(folder: Path, flag: str) -> list[Path]:
    """The PNG / JPEG files of ``folder`` in name order; other files are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainError(f"{flag}: image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainError(f"{flag}: no PNG/JPEG images in {folder}")
    return files


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """One image as (3, R, R) float32 in [-1, 1]: center crop to a square, then resize."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise TrainError(f"cannot read image {path}: {exc}") from exc
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, R, R)


def load_images(folder: Path, resolution: int, flag: str) -> torch.Tensor:
    """Every image of a folder, (N, 3, R, R) in [-1, 1]."""
    return torch.stack([load_image(p, resolution) for p in list_images(folder, flag)])


# -- device and precision --------------------------------------------------------------------


def training_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """UNet compute dtype for ``--mixed-precision``; CPU trains in fp32 only (DESIGN-NOTES 9)."""
    dtypes = dict(zip(MIXED_PRECISIONS, (torch.float32, torch.float16, torch.bfloat16)))
    if mixed_precision not in dtypes:
        raise TrainError(f"--mixed-precision must be one of {sorted(dtypes)}, got {mixed_precision!r}")
    if mixed_precision != "no" and device.type != "cuda":
        raise TrainError(f"--mixed-precision {mixed_precision} needs a CUDA GPU; CPU training runs in fp32 (use 'no')")
    return dtypes[mixed_precision]


def frozen_unet(unet: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The UNet on ``device`` in ``dtype``, frozen (``requires_grad=False``) and in eval mode."""
    unet = unet.to(device)
    if unet.dtype != dtype:
        unet = unet.to(dtype)
    return unet.requires_grad_(False).eval()


# -- diffusion pieces ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSchedule:
    """DDPM forward process ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` and the training target."""

    alphas_cumprod: torch.Tensor  # (T,) float32
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, scheduler_config: Mapping) -> "NoiseSchedule":
        """The betas of the pipeline's scheduler config (beta schedule, T, prediction type)."""
        from diffusers import DDPMScheduler

        config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        ddpm = DDPMScheduler.from_config(config)
        prediction = ddpm.config.prediction_type
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise TrainError(f"scheduler prediction_type {prediction!r} is not supported for training")
        return cls(ddpm.alphas_cumprod.float(), prediction)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _coeffs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[t].float().reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return a.sqrt(), (1.0 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, n = self._coeffs(t, x0)
        return s * x0 + n * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        s, n = self._coeffs(t, x0)
        return s * eps - n * x0  # v-prediction


@torch.no_grad()
def encode_latents(vae: nn.Module, images: torch.Tensor, device: torch.device, chunk: int = 4) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> scaled VAE posterior means (N, 4, R/8, R/8), fp32."""
    scale = float(vae.config.scaling_factor)
    out = []
    for part in images.split(chunk):
        posterior = vae.encode(part.to(device, next(vae.parameters()).dtype)).latent_dist
        out.append(posterior.mean.float() * scale)
    return torch.cat(out)


@torch.no_grad()
def encode_prompt(parts, text: str, resolution: int, device: torch.device) -> dict[str, torch.Tensor]:
    """UNet conditioning of one prompt (already stripped of routing tokens, Eq. 6), batch 1."""
    from craft_export.networks import TextEncoderNet
    from craft_ops.conditioning import build_conditioning, tokenize

    hiddens, pooled = [], None
    for i, (encoder, ids) in enumerate(zip(parts.text_encoders, tokenize(parts.tokenizers, [text]))):
        net = TextEncoderNet(encoder.to(device), penultimate=parts.arch == "sdxl", pooled=i == 1)
        out = net(torch.from_numpy(ids).to(device))
        hiddens.append(out[0].float())
        if len(out) > 1:
            pooled = out[1].float()
    return build_conditioning(parts.arch, hiddens, pooled, resolution, resolution)


def batch_cond(cond: Mapping[str, torch.Tensor], batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Broadcast batch-1 conditioning to ``batch`` rows in the UNet's dtype (as diffusers' pipelines do)."""
    return {name: value.expand(batch, *value.shape[1:]).to(dtype) for name, value in cond.items()}


def prediction(
    net: nn.Module,
    params: Mapping[str, torch.Tensor] | None,
    x0: torch.Tensor,  # (B, 4, h, w) fp32 latents
    eps: torch.Tensor,  # (B, 4, h, w) fp32 noise
    t: torch.Tensor,  # (B,) int64 timesteps
    cond: Mapping[str, torch.Tensor],
    schedule: NoiseSchedule,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``net(x_t, t, c)`` for ``x_t`` = ``x0`` noised with ``eps`` at ``t``, ``params`` overriding weights."""
    kwargs = {"sample": schedule.add_noise(x0, eps, t).to(dtype), "timestep": t.float(),
              **batch_cond(cond, x0.shape[0], dtype)}
    return functional_call(net, dict(params), kwargs=kwargs) if params else net(**kwargs)


def denoising_loss(
    net: nn.Module,
    params: Mapping[str, torch.Tensor] | None,
    x0: torch.Tensor,  # (B, 4, h, w) fp32 latents
    eps: torch.Tensor,  # (B, 4, h, w) fp32 noise
    t: torch.Tensor,  # (B,) int64 timesteps
    cond: Mapping[str, torch.Tensor],
    schedule: NoiseSchedule,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``|| target - net(x_t, t, c) ||^2`` (mean), with ``params`` overriding weights via ``functional_call``."""
    pred = prediction(net, params, x0, eps, t, cond, schedule, dtype)
    return F.mse_loss(pred.float(), schedule.target(x0, eps, t).float())


def epoch_order(sample_index: int, count: int, seed: int) -> int:
    """Item at global position ``sample_index`` of epoch-wise seeded permutations of ``count`` items.

    Stateless (a function of the position), so a resumed run draws the same items.
    """
    epoch, pos = divmod(sample_index, count)
    g = torch.Generator("cpu").manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(count, generator=g)[pos])
