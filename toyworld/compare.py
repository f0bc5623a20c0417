"""Side-by-side images from the committed assets: CRAFT-LoRA next to a direct merge, same seed.

For the README / demo: :func:`compare_images` samples one held-out shape in one held-out style
with the committed CRAFT assets (W_init + routed LoRAs, time gates, ACFG) and with the
committed ordinary LoRAs merged directly on W0 (plain CFG), from the same initial noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .catalog import ASSETS, asset_path, sampling_defaults
from .concepts import CONCEPTS, concept
from .methods import SampleSettings, build_pipeline, method, sample_images

__all__ = ["compare_images", "comparison_sheet", "write_comparison"]


def compare_images(content: str, style: str, seeds: list[int], *, assets: Path = ASSETS) -> dict[str, np.ndarray]:
    """``{"craft": (N, 64, 64, 3), "direct_merge": ...}`` uint8 for consecutive ``seeds``."""
    if concept(content).kind != "content" or concept(style).kind != "style":
        raise ValueError(f"content/style: need a content and a style concept, got {content!r}, {style!r}")
    d = sampling_defaults(assets)
    settings = SampleSettings.from_dict(d)
    out = {}
    for name, folder, backbone, routed in (("craft", "craft", assets / "backbone", True),
                                           ("direct_merge", "direct", None, False)):
        loras = {c.name: (c.kind, asset_path(f"loras/{folder}/{c.name}.safetensors", assets))
                 for c in CONCEPTS if c.name in (content, style)}
        pipe = build_pipeline(assets / "base", backbone, loras, routed=routed, settings=settings,
                              max_batch=max(len(seeds), 1))
        out[name] = sample_images(pipe, method(name), content, style, seeds)
    return out


def comparison_sheet(images: dict[str, np.ndarray], scale: int = 2):
    """A PIL image: one labelled row per method (CRAFT-LoRA, direct merge), one column per seed."""
    from PIL import Image, ImageDraw

    labels = {"craft": "CRAFT-LoRA", "direct_merge": "direct merge"}
    px, pad, label_w = 64 * scale, 4, 96
    n = max(len(v) for v in images.values())
    sheet = Image.new("RGB", (label_w + n * (px + pad), len(images) * (px + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (name, imgs) in enumerate(images.items()):
        y = row * (px + pad)
        draw.text((4, y + px // 2 - 6), labels.get(name, name), fill="black")
        for k, img in enumerate(imgs):
            tile = Image.fromarray(img).resize((px, px), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_w + k * (px + pad), y))
    return sheet


def write_comparison(out: Path, content: str, style: str, seed: int, *, n: int = 4, assets: Path = ASSETS) -> Path:
    """Sample ``n`` seeds from ``seed`` with both methods and write the labelled sheet to ``out`` (PNG)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"out: must be a .png file, got {out}")
    sheet = comparison_sheet(compare_images(content, style, list(range(seed, seed + n)), assets=assets))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
