"""A recipe's models in memory: the one loader that both ``craft export`` and the reference use.

Recipe file -> pipeline folder (base UNet or the W_init backbone, VAE, text encoder(s),
tokenizer(s), scheduler config) -> every LoRA parsed against the UNet, with the routing
checked against the UNet's module names. Every failure names the file and the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from craft_ops.lora import LoraAdapter
from craft_ops.routing import RoutingError

from .loading import PipelineParts, load_lora, load_pipeline_parts, unet_module_shapes, unet_weights
from .recipe import Recipe, RecipeError, load_recipe

log = logging.getLogger(__name__)

__all__ = ["LoadedLora", "RecipeModels", "load_recipe_models"]


@dataclass(frozen=True)
class LoadedLora:
    """A parsed LoRA with its kind and, for baked engines, the gate values to bake (None: any)."""

    name: str
    kind: str
    adapter: LoraAdapter
    gammas: tuple[float, ...] | None = None


@dataclass
class RecipeModels:
    """Everything a recipe names, loaded."""

    recipe: Recipe
    parts: PipelineParts
    shapes: dict[str, tuple[int, ...]]  # UNet module name -> weight shape
    loras: dict[str, LoadedLora]  # in recipe order, with the recipe's baked gammas
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # LoRA name -> safetensors header


def load_recipe_models(recipe: Recipe | Path | str) -> RecipeModels:
    """Load the pipeline and every LoRA of a recipe (a :class:`Recipe` or a recipe file)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    parts = load_pipeline_parts(recipe.base, backbone=recipe.backbone, variant=recipe.variant, config=recipe.config)
    shapes = unet_module_shapes(parts.unet)
    try:
        recipe.routing.check_against(list(shapes))
    except RoutingError as exc:
        raise RecipeError(f"{recipe.path}: base.routing: {exc}") from exc
    weights = unet_weights(parts.unet)  # DoRA bakes against the weights it is applied to (W_init)
    loras, metadata = {}, {}
    for spec in recipe.loras:
        adapter, header = load_lora(spec.path, shapes, name=spec.name, weights=weights)
        declared = header.get("craft.kind")
        if declared and declared != spec.kind:
            log.warning("LoRA %s is declared %s in its metadata but %s in the recipe", spec.name, declared, spec.kind)
        loras[spec.name] = LoadedLora(spec.name, spec.kind, adapter, spec.gammas)
        metadata[spec.name] = header
    return RecipeModels(recipe, parts, shapes, loras, metadata)
