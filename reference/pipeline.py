"""The PyTorch reference pipeline: the whole method in-process, ground truth for engines and server.

Per step the conditional branch runs W_init plus the routed, gated deltas of that step
(Eq. 8-9) and the unconditional branch runs W_init (Eq. 10); ACFG combines them (Eq. 11).
Variant weights are computed once (fp32, cast back) and swapped in with
``torch.func.functional_call``, so the loaded UNet itself is never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from craft_ops.aggregate import Variant, aggregate, routed_deltas
from craft_ops.lora import LoraAdapter
from craft_ops.request import Defaults, GenerateRequest, Limits, LoraInfo, Plan, plan_request
from craft_ops.routing import Routing
from craft_ops.sampling import UNetCall

from craft_ops.conditioning import build_conditioning, run_plan, to_uint8, tokenize, unet_inputs
from craft_export.loading import PipelineParts, load_lora, load_pipeline_parts, unet_module_shapes, unet_weights
from craft_export.networks import TextEncoderNet, UNetNet, VaeDecoderNet
from craft_export.recipe import Recipe

log = logging.getLogger(__name__)

__all__ = ["LoadedLora", "ReferencePipeline", "variant_weights"]


@dataclass(frozen=True)
class LoadedLora:
    name: str
    kind: str
    adapter: LoraAdapter
    gammas: tuple[float, ...] | None = None


def variant_weights(
    W_init: Mapping[str, torch.Tensor],
    variant: Variant,
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Module -> weight for the modules a variant changes (Eq. 8); empty for W_init."""
    if variant.is_base:
        return {}
    c = deltas[variant.content] if variant.content else {}
    s = deltas[variant.style] if variant.style else {}
    merged = aggregate(W_init, c, s, variant.gamma_c, variant.gamma_s, name=str(variant))
    return {m: merged[m] for m in (*c, *s)}


class ReferencePipeline:
    """Text encoding, the time-gated ACFG loop and VAE decoding, all in PyTorch."""

    def __init__(self, parts: PipelineParts, routing: Routing, loras: Sequence[LoadedLora],
                 defaults: Defaults | None = None, limits: Limits | None = None):
        self.parts = parts
        self.arch = parts.arch
        self.routing = routing
        self.loras = {lora.name: lora for lora in loras}
        self.defaults = defaults or Defaults()
        self.limits = limits or Limits()
        self.unet = UNetNet(parts.unet)
        self.text_encoders = [
            TextEncoderNet(enc, penultimate=self.arch == "sdxl", pooled=i == 1)
            for i, enc in enumerate(parts.text_encoders)
        ]
        self.vae = VaeDecoderNet(parts.vae)
        self.shapes = unet_module_shapes(parts.unet)
        self.W_init = unet_weights(parts.unet)
        routing.check_against(list(self.shapes))
        self._deltas: dict[str, dict[str, torch.Tensor]] = {}
        self._params: dict[Variant, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, limits: Limits | None = None) -> "ReferencePipeline":
        parts = load_pipeline_parts(recipe.base, backbone=recipe.backbone)
        shapes = unet_module_shapes(parts.unet)
        loras = [LoadedLora(spec.name, spec.kind, load_lora(spec.path, shapes, name=spec.name)[0])
                 for spec in recipe.loras]
        return cls(parts, recipe.routing, loras, recipe.defaults(parts.arch), limits)

    @classmethod
    def from_folder(cls, path: Path, routing: Routing, loras: Mapping[str, tuple[str, Path]] = {}) -> "ReferencePipeline":
        """A pipeline from a diffusers folder and ``{name: (kind, path)}`` LoRA files."""
        parts = load_pipeline_parts(path)
        shapes = unet_module_shapes(parts.unet)
        loaded = [LoadedLora(n, kind, load_lora(p, shapes, name=n)[0]) for n, (kind, p) in loras.items()]
        return cls(parts, routing, loaded)

    # -- catalog and weights -------------------------------------------------------------

    def catalog(self) -> dict[str, LoraInfo]:
        return {n: LoraInfo(n, lora.kind, lora.gammas) for n, lora in self.loras.items()}

    def routed(self, name: str) -> dict[str, torch.Tensor]:
        """fp32 deltas of one LoRA inside its own layer set (Eq. 7), cached."""
        if name not in self._deltas:
            lora = self.loras[name]
            self._deltas[name] = routed_deltas(lora.adapter, lora.kind, self.routing, self.shapes)
        return self._deltas[name]

    def params_for(self, variant: Variant, *, cache: bool = True) -> dict[str, torch.Tensor]:
        """``functional_call`` overrides (``unet.<module>.weight``) for a variant; cached unless
        ``cache=False`` (the exporter bakes each variant once)."""
        if variant in self._params:
            return self._params[variant]
        deltas = {n: self.routed(n) for n in (variant.content, variant.style) if n}
        weights = variant_weights(self.W_init, variant, deltas)
        params = {f"unet.{m}.weight": w for m, w in weights.items()}
        if cache:
            self._params[variant] = params
        return params

    # -- networks --------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, texts: Sequence[str], height: int, width: int) -> dict[str, torch.Tensor]:
        ids = tokenize(self.parts.tokenizers, texts)
        hiddens, pooled = [], None
        for net, token_ids in zip(self.text_encoders, ids):
            out = net(torch.from_numpy(token_ids))
            hiddens.append(out[0])
            if len(out) > 1:
                pooled = out[1]
        return build_conditioning(self.arch, hiddens, pooled, height, width)

    @torch.no_grad()
    def denoise(self, calls: Sequence[UNetCall]) -> list[torch.Tensor]:
        """One UNet forward per call, with that call's variant weights."""
        return [functional_call(self.unet, self.params_for(c.variant), kwargs=unet_inputs(c.x, c.t, c.cond))
                for c in calls]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.vae(latents))

    # -- the whole method ----------------------------------------------------------------------

    def plan(self, request: GenerateRequest) -> Plan:
        return plan_request(request, self.catalog(), self.defaults, self.limits)

    @torch.no_grad()
    def generate(self, request: GenerateRequest,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None) -> np.ndarray:
        """Images for every prompt of the request, (N, H, W, 3) uint8, in prompt order."""
        plan = self.plan(request)
        for note in plan.notes:
            log.info(note)
        scale = self.parts.latent_scale
        latent_shape = (self.parts.unet.config.in_channels, plan.height // scale, plan.width // scale)
        return run_plan(plan, self.encode, self.denoise, self.decode, latent_shape, self.parts.scheduler_config,
                        callback=callback)
