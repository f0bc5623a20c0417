"""The PyTorch reference pipeline: the whole method in-process, ground truth for engines and server.

Per step the conditional branch runs W_init plus the routed, gated deltas of that step
(Eq. 8-9) and the unconditional branch runs W_init (Eq. 10); ACFG combines them (Eq. 11).
Variant weights are computed once (fp32, cast back; :class:`craft_export.bake.VariantBaker`) and
swapped in with ``torch.func.functional_call``, so the loaded UNet itself is never modified.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from craft_export.bake import VariantBaker
from craft_export.loading import PipelineParts, load_lora, load_pipeline_parts, unet_module_shapes, unet_weights
from craft_export.networks import pipeline_nets
from craft_export.recipe import Recipe
from craft_export.recipe_models import LoadedLora, load_recipe_models
from craft_ops.aggregate import Variant
from craft_ops.conditioning import build_conditioning, run_plan, to_uint8, tokenize, unet_inputs
from craft_ops.request import Defaults, GenerateRequest, Limits, LoraInfo, Plan, plan_request
from craft_ops.routing import Routing
from craft_ops.sampling import UNetCall

log = logging.getLogger(__name__)

__all__ = ["ReferencePipeline"]


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
        nets = pipeline_nets(parts)
        self.unet, self.text_encoders, self.vae = nets.unet, nets.text_encoders, nets.vae
        self.shapes = unet_module_shapes(parts.unet)
        self.W_init = unet_weights(parts.unet)
        routing.check_against(list(self.shapes))
        self.baker = VariantBaker(self.W_init, self.shapes, routing, loras)

    @classmethod
    def from_recipe(cls, recipe: Recipe | Path | str, *, limits: Limits | None = None) -> "ReferencePipeline":
        """A pipeline from a recipe (file); every gate value in [0, 1] is allowed, baked or not."""
        models = load_recipe_models(recipe)
        loras = [dataclasses.replace(lora, gammas=None) for lora in models.loras.values()]
        return cls(models.parts, models.recipe.routing, loras, models.recipe.defaults(models.parts.arch), limits)

    @classmethod
    def from_folder(cls, path: Path, routing: Routing, loras: Mapping[str, tuple[str, Path]] = {}) -> "ReferencePipeline":
        """A pipeline from a diffusers folder and ``{name: (kind, path)}`` LoRA files."""
        parts = load_pipeline_parts(path)
        shapes = unet_module_shapes(parts.unet)
        weights = unet_weights(parts.unet)
        loaded = [LoadedLora(n, kind, load_lora(p, shapes, name=n, weights=weights)[0]) for n, (kind, p) in loras.items()]
        return cls(parts, routing, loaded)

    # -- catalog and weights -------------------------------------------------------------

    def catalog(self) -> dict[str, LoraInfo]:
        return {n: LoraInfo(n, lora.kind, lora.gammas) for n, lora in self.loras.items()}

    def routed(self, name: str) -> dict[str, torch.Tensor]:
        """fp32 deltas of one LoRA inside its own layer set (Eq. 7), cached."""
        return self.baker.routed(name)

    def params_for(self, variant: Variant) -> dict[str, torch.Tensor]:
        """``functional_call`` overrides (``unet.<module>.weight``) for a variant, cached."""
        return self.baker.params_for(variant)

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

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL's ``model_index.json`` setting (diffusers' default true): an empty negative prompt
        gives zero unconditional embeddings."""
        return bool(self.parts.extra.get("force_zeros_for_empty_prompt", False))

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
                        callback=callback, force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
