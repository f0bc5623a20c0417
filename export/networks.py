"""The networks the server runs, as thin ``nn.Module`` wrappers with tensor-only signatures.

The PyTorch reference pipeline, the ONNX exporter and the parity checks all call these
same wrappers, so "what the engine computes" is defined exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["UNetNet", "TextEncoderNet", "VaeDecoderNet", "PipelineNets", "pipeline_nets"]


class UNetNet(nn.Module):
    """eps = UNet(sample, timestep, context[, text_embeds, time_ids]) for SD 1.5 / SDXL."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.is_sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"

    def forward(
        self,
        sample: torch.Tensor,  # (B, 4, h, w)
        timestep: torch.Tensor,  # (B,) float32
        encoder_hidden_states: torch.Tensor,  # (B, 77, D)
        text_embeds: torch.Tensor | None = None,  # (B, P) SDXL pooled
        time_ids: torch.Tensor | None = None,  # (B, 6) SDXL micro-conditioning
    ) -> torch.Tensor:
        added = None
        if self.is_sdxl:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added, return_dict=False,
        )[0]


class TextEncoderNet(nn.Module):
    """Token ids -> context (and pooled embedding for SDXL's second encoder).

    SD 1.5 uses the final layer (after the final layer norm); SDXL's two encoders use the
    penultimate hidden layer, and the second also returns its projected pooled output.
    """

    def __init__(self, encoder: nn.Module, *, penultimate: bool, pooled: bool):
        super().__init__()
        self.encoder = encoder
        self.penultimate = penultimate
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (B, 77) int64
        out = self.encoder(input_ids, output_hidden_states=self.penultimate, return_dict=True)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state  # (B, 77, D)
        if self.pooled:
            return hidden, out.text_embeds  # (B, P)
        return (hidden,)


class VaeDecoderNet(nn.Module):
    """Scaled latents -> image in [0, 1], NCHW float, decoded as diffusers' SD / SDXL pipelines do.

    SD 1.5 (``StableDiffusionPipeline``): ``latents / scaling_factor``. SDXL
    (``StableDiffusionXLPipeline``): ``latents * latents_std / scaling_factor + latents_mean`` per
    channel when the VAE config has both statistics, else ``latents / scaling_factor``. Neither
    pipeline uses the config's ``shift_factor`` (an SD3 / Flux VAE entry), so it is ignored here too.
    The exported decoder is this module, so the served pipeline decodes the same way.
    """

    def __init__(self, vae: nn.Module, arch: str = "sd15"):
        super().__init__()
        self.vae = vae
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        self.has_latent_stats = arch == "sdxl" and mean is not None and std is not None
        if self.has_latent_stats:
            self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                                 persistent=False)
            self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                                 persistent=False)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:  # (B, 4, h, w) -> (B, 3, 8h, 8w)
        if self.has_latent_stats:
            mean, std = self.latents_mean.to(latent.dtype), self.latents_std.to(latent.dtype)  # (1, 4, 1, 1)
            latent = latent * std / self.scaling_factor + mean
        else:
            latent = latent / self.scaling_factor
        image = self.vae.decode(latent, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


@dataclass(frozen=True)
class PipelineNets:
    """The wrapped networks of one loaded pipeline (UNet, text encoder(s), VAE decoder)."""

    unet: UNetNet
    text_encoders: list[TextEncoderNet]
    vae: VaeDecoderNet


def pipeline_nets(parts) -> PipelineNets:
    """Wrap a loaded pipeline's networks (``craft_export.loading.PipelineParts``): SDXL's encoders
    use their penultimate layer and the second returns the pooled embedding (DESIGN-NOTES 6)."""
    sdxl = parts.arch == "sdxl"
    encoders = [TextEncoderNet(enc, penultimate=sdxl, pooled=i == 1) for i, enc in enumerate(parts.text_encoders)]
    return PipelineNets(UNetNet(parts.unet), encoders, VaeDecoderNet(parts.vae, parts.arch))
