"""The embedded default: tiny SD 1.5 / SDXL pipelines, sample LoRAs and recipes, built offline.

``write_demo_assets(out)`` writes::

    out/sd15-tiny/  out/sdxl-tiny/           diffusers pipeline folders
    out/loras/<arch>-<name>.safetensors       2 content + 2 style LoRAs per architecture
    out/recipe-sd15.toml  out/recipe-sdxl.toml

The LoRAs touch attention projections and 3x3 resnet convolutions in *every* block, so
a content LoRA also carries deltas in style layers (and vice versa): routing (Eq. 7) is
what keeps them out, and that is observable in the outputs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .loading import load_unet, unet_module_shapes
from .tiny import build_tiny_pipeline

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


def recipe_text(arch: str, loras: list[str] | None = None, root: Path | None = None) -> str:
    """A recipe for the tiny model of ``arch`` with the named demo LoRAs (default: all).

    Paths are relative to the recipe (as written by ``demo-assets``) unless ``root`` names
    the demo-assets folder, which makes them absolute.
    """
    prefix = f"{root}/" if root is not None else ""
    lines = [
        f"# Demo recipe: tiny {arch} model and generated LoRAs (craft demo-assets).",
        "[base]",
        f'path = "{prefix}{arch}-tiny"',
        f'routing = "{arch}"',
        "",
    ]
    for name in DEMO_LORAS if loras is None else loras:
        kind = DEMO_LORAS[name][0]
        lines += ["[[lora]]", f'name = "{name}"', f'kind = "{kind}"', f'path = "{prefix}loras/{arch}-{name}.safetensors"', ""]
    lines += [
        "[defaults]", "steps = 8", "height = 64", "width = 64", 'scheduler = "euler"', "",
        "[engine]", "min_size = 64", "opt_size = 64", "max_size = 128", "max_batch = 8", "",
    ]
    return "\n".join(lines)


def write_demo_assets(out: Path, *, seed: int = 0) -> Path:
    """Write tiny pipelines, demo LoRAs and recipes into ``out`` (deterministic for a seed)."""
    out = Path(out)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    for arch in ("sd15", "sdxl"):
        folder = build_tiny_pipeline(arch, out / f"{arch}-tiny", seed=seed + (0 if arch == "sd15" else 1))
        shapes = unet_module_shapes(load_unet(folder))
        modules = lora_target_modules(shapes)
        for name, (kind, fmt, offset) in DEMO_LORAS.items():
            rank, alpha = 4, (2.0 if fmt == "kohya" else 4.0)
            sd = make_lora_state_dict(shapes, modules, rank=rank, alpha=alpha, seed=seed * 100 + offset, fmt=fmt)
            metadata = {"craft.kind": kind, "craft.arch": arch, "craft.rank": str(rank)}
            if fmt == "peft":
                metadata["lora_adapter_metadata"] = json.dumps({"r": rank, "lora_alpha": alpha})
            save_file(sd, str(out / "loras" / f"{arch}-{name}.safetensors"), metadata=metadata)
        (out / f"recipe-{arch}.toml").write_text(recipe_text(arch))
        log.info("wrote %s demo assets", arch)
    return out
