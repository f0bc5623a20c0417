"""The embedded default: tiny SD 1.5 / SDXL pipelines, sample LoRAs and recipes, built offline.

``write_demo_assets(out)`` writes::

    out/sd15-tiny/  out/sdxl-tiny/           diffusers pipeline folders
    out/loras/<arch>-<name>.safetensors       2 content + 2 style LoRAs per architecture
    out/recipe-sd15.toml  out/recipe-sdxl.toml

``write_demo_assets(out, size="full")`` writes the same with the public full-size
architectures (random weights) under ``<arch>-full`` names: models for exporting and timing
TensorRT engines of the real layouts (``craft demo-assets --size full``).

The LoRAs touch attention projections and 3x3 resnet convolutions in *every* block, so
a content LoRA also carries deltas in style layers (and vice versa): routing (Eq. 7) is
what keeps them out, and that is observable in the outputs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from craft_export.loading import unet_module_shapes
from craft_export.lora_files import adapter_metadata

log = logging.getLogger(__name__)

__all__ = ["DEMO_LORAS", "write_demo_assets", "recipe_text", "make_lora_state_dict", "lora_target_modules"]

# name -> (kind, on-disk format, seed offset)
DEMO_LORAS = {
    "dog": ("content", "peft", 11),
    "bull": ("content", "kohya", 12),
    "watercolor": ("style", "kohya", 21),
    "fire": ("style", "peft", 22),
}
_TARGET_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                    "attn2.to_v", "attn2.to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.2")


def lora_target_modules(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Attention, projection, feed-forward and 3x3 resnet conv modules of a UNet."""
    return sorted(m for m in shapes if m.endswith(_TARGET_SUFFIXES) and "time_emb" not in m)


def make_lora_state_dict(
    shapes: dict[str, tuple[int, ...]],
    modules: list[str],
    *,
    rank: int,
    alpha: float,
    seed: int,
    fmt: str,
    strength: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Seeded LoRA factors for ``modules`` written in ``fmt`` (``peft`` / ``kohya`` / ``diffusers-legacy``)."""
    g = torch.Generator("cpu").manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for m in modules:
        shape = shapes[m]
        d_out, d_in = shape[0], shape[1]
        kernel = tuple(shape[2:])
        # |dW| ~ strength * |W| for weights initialised with std 1/sqrt(fan_in)
        A = torch.randn((rank, d_in, *kernel), generator=g) / math.prod(shape[1:]) ** 0.5
        B = torch.randn((d_out, rank, *(1,) * len(kernel)), generator=g) * strength * rank ** 0.5 / alpha
        if fmt == "peft":
            sd[f"unet.{m}.lora_A.weight"], sd[f"unet.{m}.lora_B.weight"] = A, B
        elif fmt == "kohya":
            key = "lora_unet_" + m.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = A, B
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
        elif fmt == "diffusers-legacy":
            sd[f"unet.{m}.lora.down.weight"], sd[f"unet.{m}.lora.up.weight"] = A, B
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}")
    return {k: v.contiguous() for k, v in sd.items()}


# Recipe [defaults] and [engine] per size: the tiny demo's, and the full-size models' usual
# settings (SD 1.5: 50 steps at 512 px, engines 512-768 px; SDXL: 30 steps at 1024 px, 768-1024 px).
_RECIPE_SETTINGS = {
    ("tiny", "sd15"): (8, 64, (64, 64, 128)), ("tiny", "sdxl"): (8, 64, (64, 64, 128)),
    ("full", "sd15"): (50, 512, (512, 512, 768)), ("full", "sdxl"): (30, 1024, (768, 1024, 1024)),
}
_LORA_RANK = {"tiny": 4, "full": 16}


def _asset_names(arch: str, size: str) -> tuple[str, str, str]:
    """(model folder, LoRA file prefix, recipe file) of ``arch`` / ``size`` in a demo-assets folder."""
    if size == "tiny":
        return f"{arch}-tiny", arch, f"recipe-{arch}.toml"
    return f"{arch}-{size}", f"{arch}-{size}", f"recipe-{arch}-{size}.toml"


def recipe_text(arch: str, loras: list[str] | None = None, root: Path | None = None, size: str = "tiny") -> str:
    """A recipe for the ``size`` model of ``arch`` with the named demo LoRAs (default: all).

    Paths are relative to the recipe (as written by ``demo-assets``) unless ``root`` names
    the demo-assets folder, which makes them absolute.
    """
    prefix = f"{root}/" if root is not None else ""
    stem, lora_stem, _ = _asset_names(arch, size)
    steps, px, (lo, opt, hi) = _RECIPE_SETTINGS[size, arch]
    what = "tiny" if size == "tiny" else "full-size (random weights)"
    lines = [
        f"# Demo recipe: {what} {arch} model and generated LoRAs (craft demo-assets).",
        "[base]",
        f'path = "{prefix}{stem}"',
        f'routing = "{arch}"',
        "",
    ]
    for name in DEMO_LORAS if loras is None else loras:
        kind = DEMO_LORAS[name][0]
        lines += ["[[lora]]", f'name = "{name}"', f'kind = "{kind}"', f'path = "{prefix}loras/{lora_stem}-{name}.safetensors"', ""]
    lines += [
        "[defaults]", f"steps = {steps}", f"height = {px}", f"width = {px}", 'scheduler = "euler"', "",
        "[engine]", f"min_size = {lo}", f"opt_size = {opt}", f"max_size = {hi}", "max_batch = 8", "",
    ]
    return "\n".join(lines)


def write_demo_assets(out: Path, *, seed: int = 0, size: str = "tiny", arches: tuple[str, ...] = ("sd15", "sdxl")) -> Path:
    """Write pipelines, demo LoRAs and recipes into ``out`` (deterministic for a seed).

    ``size="tiny"``: ``<arch>-tiny/``, ``loras/<arch>-<name>.safetensors``, ``recipe-<arch>.toml``.
    ``size="full"``: the public full-size architectures with random fp16 weights (SD 1.5 about
    2 GB, SDXL about 7 GB on disk), rank-16 fp16 LoRAs: ``<arch>-full/``,
    ``loras/<arch>-full-<name>.safetensors``, ``recipe-<arch>-full.toml``.
    """
    from diffusers import UNet2DConditionModel

    from .tiny import SIZES, build_pipeline

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    for arch in arches:
        if arch not in ("sd15", "sdxl"):
            raise ValueError(f"arch must be sd15 or sdxl, got {arch!r}")
    out = Path(out)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    for arch in arches:
        stem, lora_stem, recipe = _asset_names(arch, size)
        folder = build_pipeline(arch, out / stem, seed=seed + (0 if arch == "sd15" else 1), size=size)
        with torch.device("meta"):  # shapes only: no weights read (10 GB for a full-size SDXL UNet)
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        shapes = unet_module_shapes(unet)
        modules = lora_target_modules(shapes)
        rank = _LORA_RANK[size]
        for name, (kind, fmt, offset) in DEMO_LORAS.items():
            alpha = rank / 2 if fmt == "kohya" else float(rank)
            sd = make_lora_state_dict(shapes, modules, rank=rank, alpha=alpha, seed=seed * 100 + offset, fmt=fmt)
            if size == "full":  # as LoRAs are usually shipped
                sd = {k: v if v.ndim == 0 else v.half() for k, v in sd.items()}
            metadata = {"craft.kind": kind, "craft.arch": arch, "craft.rank": str(rank)}
            if fmt == "peft":
                metadata["lora_adapter_metadata"] = adapter_metadata({m: rank for m in modules}, alpha)
            save_file(sd, str(out / "loras" / f"{lora_stem}-{name}.safetensors"), metadata=metadata)
        (out / recipe).write_text(recipe_text(arch, size=size))
        log.info("wrote %s %s demo assets", size, arch)
    return out
