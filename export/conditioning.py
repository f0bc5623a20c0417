"""Pieces shared by the PyTorch reference and the Triton pipeline: tokens, conditioning, images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["tokenize", "build_conditioning", "to_uint8", "unet_inputs"]


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
