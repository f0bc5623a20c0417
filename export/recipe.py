"""Recipe files (TOML): which base, which backbone, which routing, which LoRAs, which defaults.

```
[base]
path = "models/sdxl"            # diffusers folder (SD 1.5 or SDXL, detected from the config),
                                # or a single-file checkpoint "models/sdxl.safetensors"
variant = "fp16"                # optional: weight variant (default: the one the folder holds)
config = "models/sdxl-configs"  # single file only: folder with tokenizer/ (tokenizer_2/), configs
backbone = "models/w_init_unet" # optional: W_init UNet folder (Rank-FT output)
routing = "sdxl"                # preset name, or [base.routing] content = [...], style = [...]
[[lora]]
name = "dog"
kind = "content"                # or "style"
path = "loras/dog.safetensors"
gammas = [1.0]                  # optional: gate values to bake (default [1.0])
[defaults]                      # optional request defaults
steps = 30
[engine]                        # optional image-size range of the exported engines (pixels)
min_size = 512
max_size = 1024
max_pixels = 4194304            # optional: prompts x height x width per request (default max_batch x max_size^2)
```
Relative paths are relative to the recipe file.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from craft_ops.gates import GateError, Window
from craft_ops.guidance import GUIDANCE_MAX
from craft_ops.request import Defaults
from craft_ops.routing import Routing, RoutingError, resolve_routing
from craft_ops.sampling import MODES, SCHEDULERS

__all__ = ["RecipeError", "LoraSpec", "EngineRange", "Recipe", "load_recipe", "load_confined_recipe", "parse_recipe",
           "recipe_paths", "ARCH_DEFAULTS"]

NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")

# Per-architecture request defaults and engine size ranges (pixels).
ARCH_DEFAULTS: Mapping[str, dict[str, Any]] = {
    "sd15": {"guidance": 6.5, "size": 512, "min_size": 256, "max_size": 768},
    "sdxl": {"guidance": 4.0, "size": 1024, "min_size": 512, "max_size": 1024},
}


class RecipeError(ValueError):
    """A recipe that cannot be exported; the message names the file and field."""


@dataclass(frozen=True)
class LoraSpec:
    name: str
    kind: str
    path: Path
    gammas: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class EngineRange:
    """Image sizes (pixels, square bounds) and batch sizes the engines are built for."""

    min_size: int
    opt_size: int
    max_size: int
    max_batch: int = 8
    max_pixels: int = 0  # prompts x height x width per request; 0: max_batch x max_size^2


@dataclass(frozen=True)
class Recipe:
    path: Path
    base: Path
    backbone: Path | None
    routing: Routing
    loras: tuple[LoraSpec, ...]
    defaults_table: Mapping[str, Any] = field(default_factory=dict)
    engine_table: Mapping[str, Any] = field(default_factory=dict)
    variant: str | None = None  # weight variant to prefer (``fp16``)
    config: Path | None = None  # configs / tokenizers of a single-file base

    def lora(self, name: str) -> LoraSpec:
        for spec in self.loras:
            if spec.name == name:
                return spec
        raise RecipeError(f"{self.path}: no LoRA named {name!r}")

    def defaults(self, arch: str) -> Defaults:
        """Request defaults: architecture defaults overridden by the recipe's ``[defaults]``."""
        return _defaults(self.path, arch, self.defaults_table)

    def engine_range(self, arch: str) -> EngineRange:
        return _engine_range(self.path, arch, self.engine_table, self.defaults(arch))


def _fail(path: Path, field_name: str, reason: str) -> RecipeError:
    return RecipeError(f"{path}: {field_name}: {reason}")


def _resolve(recipe_path: Path, value: Any, field_name: str) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(recipe_path, field_name, f"must be a non-empty path string, got {value!r}")
    p = Path(value).expanduser()
    return (p if p.is_absolute() else recipe_path.parent / p).resolve()


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe file (paths are checked to exist, not loaded)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from exc
    return parse_recipe(data, path)


def parse_recipe(data: Mapping[str, Any], path: Path) -> Recipe:
    unknown = set(data) - {"base", "lora", "defaults", "engine"}
    if unknown:
        raise _fail(path, "recipe", f"unknown tables {sorted(unknown)}")
    base = data.get("base")
    if not isinstance(base, Mapping):
        raise _fail(path, "[base]", "missing table")
    extra = set(base) - {"path", "backbone", "routing", "variant", "config"}
    if extra:
        raise _fail(path, "[base]", f"unknown keys {sorted(extra)}")
    base_path = _resolve(path, base.get("path"), "base.path")
    if base_path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise _fail(path, "base.path", f"pickle checkpoints are refused (they can run code when loaded); "
                                       f"use the .safetensors file: {base_path}")
    single_file = base_path.suffix.lower() == ".safetensors"
    if single_file and not base_path.is_file():
        raise _fail(path, "base.path", f"single-file checkpoint not found: {base_path}")
    if not single_file and not base_path.is_dir():
        raise _fail(path, "base.path", f"folder not found: {base_path}")
    variant = base.get("variant")
    if variant is not None and (not isinstance(variant, str) or not NAME_RE.match(variant)):
        raise _fail(path, "base.variant", f"must be a name like 'fp16', got {variant!r}")
    config = None
    if base.get("config") is not None:
        config = _resolve(path, base["config"], "base.config")
        if not config.is_dir():
            raise _fail(path, "base.config", f"folder not found: {config}")
        if not single_file:
            raise _fail(path, "base.config", "only a single-file base.path (.safetensors) takes a config folder")
    backbone = None
    if base.get("backbone") is not None:
        backbone = _resolve(path, base["backbone"], "base.backbone")
        if not backbone.is_dir():
            raise _fail(path, "base.backbone", f"folder not found: {backbone}")
    try:
        routing = resolve_routing(base.get("routing", "sd15"))
    except RoutingError as exc:
        raise _fail(path, "base.routing", str(exc)) from exc
    loras = tuple(_lora(path, i, entry) for i, entry in enumerate(data.get("lora", [])))
    names = [spec.name for spec in loras]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail(path, "lora.name", f"duplicate names {dupes}")
    defaults = data.get("defaults", {})
    engine = data.get("engine", {})
    if not isinstance(defaults, Mapping) or not isinstance(engine, Mapping):
        raise _fail(path, "[defaults]/[engine]", "must be tables")
    recipe = Recipe(path, base_path, backbone, routing, loras, dict(defaults), dict(engine), variant, config)
    _defaults(path, "sd15", defaults)  # validate keys and values early
    return recipe


def _lora(path: Path, i: int, entry: Any) -> LoraSpec:
    where = f"lora[{i}]"
    if not isinstance(entry, Mapping):
        raise _fail(path, where, "must be a table")
    extra = set(entry) - {"name", "kind", "path", "gammas"}
    if extra:
        raise _fail(path, where, f"unknown keys {sorted(extra)}")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _fail(path, f"{where}.name", f"must match [A-Za-z0-9_-]+, got {name!r}")
    kind = entry.get("kind")
    if kind not in ("content", "style"):
        raise _fail(path, f"{where}.kind", f"must be 'content' or 'style', got {kind!r}")
    lora_path = _resolve(path, entry.get("path"), f"{where}.path")
    gammas = entry.get("gammas", [1.0])
    if not isinstance(gammas, list) or not gammas or not all(
        isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and 0 < g <= 1 for g in gammas
    ):
        raise _fail(path, f"{where}.gammas", f"must be a non-empty list of numbers in (0, 1], got {gammas!r}")
    return LoraSpec(name, kind, lora_path, tuple(sorted({float(g) for g in gammas})))


def _defaults(path: Path, arch: str, table: Mapping[str, Any]) -> Defaults:
    """The recipe's ``[defaults]`` over the architecture's (guidance, size) over :class:`Defaults`'."""
    allowed = {"steps", "guidance", "scheduler", "height", "width", "mode", "content_window", "style_window"}
    extra = set(table) - allowed
    if extra:
        raise _fail(path, "[defaults]", f"unknown keys {sorted(extra)}; allowed {sorted(allowed)}")
    arch_defaults = ARCH_DEFAULTS[arch]
    size = arch_defaults["size"]
    values = {**Defaults().as_dict(), "guidance": arch_defaults["guidance"], "height": size, "width": size, **table}
    steps = values["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise _fail(path, "defaults.steps", f"must be an integer in [1, 1000], got {steps!r}")
    g = values["guidance"]
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0 <= g <= GUIDANCE_MAX:
        raise _fail(path, "defaults.guidance", f"must be a finite number in [0, {GUIDANCE_MAX:g}], got {g!r}")
    if values["scheduler"] not in SCHEDULERS:
        raise _fail(path, "defaults.scheduler", f"must be one of {sorted(SCHEDULERS)}, got {values['scheduler']!r}")
    if values["mode"] not in MODES:
        raise _fail(path, "defaults.mode", f"must be one of {list(MODES)}, got {values['mode']!r}")
    for key in ("height", "width"):
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8:
            raise _fail(path, f"defaults.{key}", f"must be a positive multiple of 8, got {v!r}")
    windows = {}
    for key in ("content_window", "style_window"):
        try:
            windows[key] = Window.of(values[key], key).bounds
        except GateError as exc:
            raise _fail(path, f"defaults.{key}", str(exc)) from exc
    return Defaults(steps=steps, guidance=float(g), scheduler=values["scheduler"],
                    height=values["height"], width=values["width"], mode=values["mode"], **windows)


def _engine_range(path: Path, arch: str, table: Mapping[str, Any], defaults: Defaults) -> EngineRange:
    extra = set(table) - {"min_size", "max_size", "opt_size", "max_batch", "max_pixels"}
    if extra:
        raise _fail(path, "[engine]", f"unknown keys {sorted(extra)}")
    d = ARCH_DEFAULTS[arch]
    lo = table.get("min_size", min(d["min_size"], defaults.height, defaults.width))
    hi = table.get("max_size", max(d["max_size"], defaults.height, defaults.width))
    opt = table.get("opt_size", min(max(defaults.height, lo), hi))
    batch = table.get("max_batch", 8)
    pixels = table.get("max_pixels", batch * hi * hi)
    for key, v in (("min_size", lo), ("max_size", hi), ("opt_size", opt), ("max_batch", batch), ("max_pixels", pixels)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise _fail(path, f"engine.{key}", f"must be a positive integer, got {v!r}")
    for key, v in (("min_size", lo), ("max_size", hi), ("opt_size", opt)):
        if v % 8:
            raise _fail(path, f"engine.{key}", f"must be a multiple of 8, got {v}")
    if not lo <= opt <= hi:
        raise _fail(path, "[engine]", f"need min_size <= opt_size <= max_size, got {lo}, {opt}, {hi}")
    for key in ("height", "width"):
        v = getattr(defaults, key)
        if not lo <= v <= hi:
            raise _fail(path, f"defaults.{key}", f"{v} lies outside the engine range [{lo}, {hi}]")
    if pixels < lo * lo:
        raise _fail(path, "engine.max_pixels", f"{pixels} is less than one image of min_size ({lo} x {lo})")
    return EngineRange(lo, opt, hi, batch, pixels)


def recipe_paths(recipe: Recipe) -> list[tuple[str, Path]]:
    """Every file or folder a recipe names, with its field."""
    paths = [("recipe", recipe.path), ("base.path", recipe.base)]
    paths += [(f"base.{k}", p) for k, p in (("backbone", recipe.backbone), ("config", recipe.config)) if p]
    return paths + [(f"lora {spec.name!r}.path", spec.path) for spec in recipe.loras]


def load_confined_recipe(path: Path | str, confine_to: Sequence[Path] = ()) -> Recipe:
    """:func:`load_recipe`, then every path it names checked to resolve inside ``confine_to`` (when given);
    a path outside is an :class:`~craft_export.options.ExportError` naming the field."""
    from .options import ExportError
    from .safe_files import UnsafeFileError, check_confined

    recipe = load_recipe(path)
    if confine_to:
        try:
            check_confined(recipe_paths(recipe), confine_to)
        except UnsafeFileError as exc:
            raise ExportError(str(exc)) from exc
    return recipe
