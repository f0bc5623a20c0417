"""The committed toy-world assets, what they contain, and a demo folder built from them.

``toyworld/assets/`` (committed, fp16 except the judges)::

    base/                     the trained base (SD 1.5 diffusers layout)
    judges.safetensors        shape and style judges
    backbone/unet/            W_init (Rank-FT on the held-out concepts' references)
    loras/craft/<c>.safetensors    routed LoRAs trained on W_init (CRAFT-LoRA)
    loras/direct/<c>.safetensors   ordinary all-layer LoRAs trained on W0 (direct merge)
    settings.json             how they were trained, and the sampling defaults

:func:`write_toy_demo_assets` (``craft demo-assets``) copies them into ``OUT/toy/`` and writes
``OUT/recipe-toy.toml``, so ``craft generate --local --recipe OUT/recipe-toy.toml`` and
``craft export`` + ``craft serve`` draw the held-out shapes in the held-out styles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .concepts import CONCEPTS, TOY_ROUTING, pair_prompt
from .world import BASE_SHAPES, BASE_STYLES, COLORS, HELD_OUT_SHAPES, HELD_OUT_STYLES, SHAPES, STYLES, WorldError

__all__ = ["ASSETS", "RECIPE", "asset_path", "list_world", "write_toy_demo_assets", "recipe_text", "sampling_defaults",
           "committed_craft_loras"]

ASSETS = Path(__file__).resolve().parent / "assets"
_LORA_DIRS = {"craft": "routed LoRA on W_init (CRAFT-LoRA)", "direct": "all-layer LoRA on W0 (direct merge)"}
RECIPE = "recipe-toy.toml"
# Sampling the assets were tuned with (tuning seeds only); settings.json may override.
SAMPLING = {"steps": 20, "omega": 1.5, "scheduler": "euler", "content_window": [0.0, 1.0], "style_window": [0.5, 1.0]}
TOY_DIR = "toy"  # the assets' folder inside a demo-assets folder


def asset_path(name: str, root: Path = ASSETS) -> Path:
    """A committed asset (``base``, ``judges.safetensors``, ``backbone``, ``loras/...``); missing ones are an error."""
    path = Path(root) / name
    if not path.exists():
        raise WorldError(f"asset: {path} is missing; train it with `craft toyworld train` / `craft toyworld train-loras`")
    return path


def sampling_defaults(root: Path = ASSETS) -> dict:
    """Steps, omega, scheduler (and time-gate windows / mode, if tuned) of the committed assets (``settings.json``)."""
    settings = Path(root) / "settings.json"
    data = json.loads(settings.read_text()) if settings.is_file() else {}
    return {**SAMPLING, **data.get("sampling", {})}


def list_world() -> dict:
    """Shapes, styles, colours, what is held out, and the committed LoRAs (name, kind, token, teaches)."""
    loras = []
    for folder, what in _LORA_DIRS.items():
        for c in CONCEPTS:
            path = ASSETS / "loras" / folder / f"{c.name}.safetensors"
            loras.append({"name": c.name, "kind": c.kind, "token": c.token, "prompt": c.prompt, "teaches": c.teaches,
                          "variant": folder, "trained_as": what, "file": str(path), "present": path.is_file()})
    return {
        "shapes": list(SHAPES), "styles": list(STYLES), "colors": list(COLORS),
        "held_out_shapes": list(HELD_OUT_SHAPES), "held_out_styles": list(HELD_OUT_STYLES),
        "base_shapes": list(BASE_SHAPES), "base_styles": list(BASE_STYLES),
        "caption_example": "a red circle with stripes", "pair_prompt": pair_prompt(), "loras": loras,
        "base": str(ASSETS / "base"), "judges": str(ASSETS / "judges.safetensors"),
    }


def committed_craft_loras(root: Path = ASSETS) -> list[str]:
    """Names of the routed CRAFT LoRAs present under ``root`` (``loras/craft/``), in concept order."""
    return [c.name for c in CONCEPTS if (Path(root) / "loras" / "craft" / f"{c.name}.safetensors").is_file()]


def recipe_text(prefix: str = "", *, backbone: bool = True, loras: list[str] | None = None,
                root: Path = ASSETS) -> str:
    """The demo recipe: committed base (+ W_init) + the routed CRAFT LoRAs (default: all four), 64 px engines."""
    d = sampling_defaults(root)
    lines = ["# Toy-world demo recipe (craft demo-assets): trained base, Rank-FT backbone (W_init),",
             "# routed content LoRAs (held-out shapes, token sks) and style LoRAs (held-out styles, token zzs).",
             "[base]", f'path = "{prefix}base"', *([f'backbone = "{prefix}backbone"'] if backbone else []),
             "", "[base.routing]", f"content = {json.dumps(TOY_ROUTING['content'])}",
             f"style = {json.dumps(TOY_ROUTING['style'])}", ""]
    for c in CONCEPTS:
        if loras is None or c.name in loras:
            lines += ["[[lora]]", f'name = "{c.name}"', f'kind = "{c.kind}"',
                      f'path = "{prefix}loras/craft/{c.name}.safetensors"', ""]
    windows = [f"{k} = [{float(d[k][0])}, {float(d[k][1])}]" for k in ("content_window", "style_window") if k in d]
    lines += ["[defaults]", f"steps = {d['steps']}", f"guidance = {float(d['omega'])}", f'scheduler = "{d["scheduler"]}"',
              *([f'mode = "{d["mode"]}"'] if "mode" in d else []), *windows, "height = 64", "width = 64", "",
              "[engine]", "min_size = 64", "opt_size = 64", "max_size = 128", "max_batch = 8", ""]
    return "\n".join(lines)


def write_toy_demo_assets(out: Path, root: Path = ASSETS) -> Path:
    """Copy the committed assets into ``out/toy/`` and write ``out/recipe-toy.toml``; returns the recipe.

    The recipe names W_init and the routed CRAFT LoRAs that are committed (a checkout without them
    gets a recipe over the base alone); the direct-merge LoRAs and the judges are copied beside them.
    """
    out, root = Path(out), Path(root)
    dest = out / TOY_DIR
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(asset_path("base", root), dest / "base", dirs_exist_ok=True)
    for name in ("backbone", "loras"):
        if (root / name).is_dir():
            shutil.copytree(root / name, dest / name, dirs_exist_ok=True)
    for name in ("judges.safetensors", "judges_log.json", "settings.json"):
        if (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    recipe = out / RECIPE
    recipe.write_text(recipe_text(f"{TOY_DIR}/", backbone=(root / "backbone" / "unet").is_dir(),
                                  loras=committed_craft_loras(root), root=root))
    return recipe
