"""Pieces every pipeline shares (the PyTorch reference, the served runtime, training): tokens,
conditioning, images, and the request loop itself (:func:`run_plan`).

Tokenizers, encoders, denoisers and decoders come in as callables; nothing here does I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .request import Plan, group_noise
from .sampling import Denoiser, make_scheduler, sample

__all__ = ["tokenize", "build_conditioning", "zero_conditioning", "to_uint8", "unet_inputs", "run_plan"]

Encode = Callable[[Sequence[str], int, int], dict[str, torch.Tensor]]


def tokenize(tokenizers: Sequence, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids per tokenizer, padded/truncated to its max length: [(B, 77) int64, ...]."""
    out = []
    for tok in tokenizers:
        ids = tok(list(texts), padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="np").input_ids
        out.append(ids.astype(np.int64))
    return out


def build_conditioning(
    arch: str,
    hiddens: Sequence[torch.Tensor],
    pooled: torch.Tensor | None,
    height: int,
    width: int,
) -> dict[str, torch.Tensor]:
    """UNet conditioning from text-encoder outputs; SDXL adds pooled embeds and time ids.

    SDXL micro-conditioning (DESIGN-NOTES 6): ``time_ids = (H, W, 0, 0, H, W)``.
    """
    context = torch.cat(list(hiddens), dim=-1) if len(hiddens) > 1 else hiddens[0]  # (B, 77, D)
    cond = {"encoder_hidden_states": context}
    if arch == "sdxl":
        if pooled is None:
            raise ValueError("SDXL conditioning needs the pooled embedding of text_encoder_2")
        batch = context.shape[0]
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
        cond["text_embeds"] = pooled  # (B, P)
        cond["time_ids"] = time_ids.to(context.device).expand(batch, 6).contiguous()  # (B, 6)
    return cond


def zero_conditioning(cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unconditional branch of an empty negative prompt under SDXL's ``force_zeros_for_empty_prompt``.

    As diffusers' ``StableDiffusionXLPipeline.encode_prompt``: zero context and zero pooled embedding
    (batch 1, shaped like ``cond``'s); ``time_ids`` unchanged, i.e. those of the conditional branch.
    """
    return {name: value[:1] if name == "time_ids" else torch.zeros_like(value[:1]) for name, value in cond.items()}


def unet_inputs(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet network's named inputs for one branch: timestep as (B,) float32."""
    batch = x.shape[0]
    inputs = {"sample": x, "timestep": t.to(torch.float32).reshape(1).expand(batch).contiguous()}
    for name, value in cond.items():
        if value.shape[0] != batch:
            value = value.expand(batch, *value.shape[1:]) if value.shape[0] == 1 else value
        inputs[name] = value
    return inputs


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8."""
    arr = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def run_plan(
    plan: Plan,
    encode: Encode,
    denoise: Denoiser,
    decode: Callable[[torch.Tensor], np.ndarray],
    latent_shape: tuple[int, int, int],
    scheduler_config: Mapping,
    *,
    device="cpu",
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    force_zeros_for_empty_prompt: bool = False,
) -> np.ndarray:
    """A planned request -> (N, H, W, 3) uint8 images in prompt order.

    One sampling loop per prompt group (same LoRAs and settings), seeded noise per prompt;
    ``callback(step, total, latents)`` counts steps over all groups. The reference and
    the served pipeline both run this, with their own encode / denoise / decode.
    ``force_zeros_for_empty_prompt`` (the SDXL checkpoint's ``model_index.json`` setting): an
    empty negative prompt gives zero embeddings (:func:`zero_conditioning`) instead of the
    encoded empty string, on the unconditional branch of ACFG and CFG alike.
    """
    zeros = force_zeros_for_empty_prompt and plan.negative_prompt == ""
    uncond = None if zeros else encode([plan.negative_prompt], plan.height, plan.width)
    total = sum(g.config.steps for g in plan.groups)
    done = 0

    def on_step(step: int, steps: int, latents: torch.Tensor) -> None:
        if callback is not None:
            callback(done + step, total, latents)

    images: list[np.ndarray | None] = [None] * plan.num_prompts
    for group in plan.groups:
        cond = encode(group.texts, plan.height, plan.width)
        if uncond is None:
            uncond = zero_conditioning(cond)
        noise, generator = group_noise(group, latent_shape, device)
        scheduler = make_scheduler(plan.scheduler, scheduler_config)
        latents = sample(denoise, scheduler, noise, cond, uncond, group.config, generator=generator, callback=on_step)
        done += group.config.steps
        for idx, image in zip(group.indices, decode(latents)):
            images[idx] = image
    return np.stack(images)
