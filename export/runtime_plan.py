"""What ``craft export --lora-mode runtime`` adds to an export: the runtime network job and the LoRA factor files.

:class:`RuntimeSide` is built in step 1 of an export (validation): every LoRA is checked against the
runtime network's layout there (:func:`craft_ops.runtime_lora.runtime_factors` names what it refuses),
so nothing is written for a recipe with a LoRA the network cannot take. Hot pairs (``--pairs``) are
baked as in baked mode; every other LoRA runs on the runtime network only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from craft_ops.aggregate import Variant
from craft_ops.runtime_lora import RuntimeLayout, RuntimeLoraError, runtime_factors

from . import runtime_export as rt
from .options import ExportError, ExportOptions
from .plan import FORMAT_VERSION, plan_variants, stable_hash
from .recipe import Recipe
from .specs import NetworkSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = ["RuntimeSide", "runtime_side", "plan_runtime_variants", "fingerprint"]


def plan_runtime_variants(kinds: Mapping[str, str], gammas: Mapping[str, Sequence[float]],
                          pairs: Sequence[tuple[str, str]]) -> list[Variant]:
    """W_init, and for each hot pair what baked mode plans for it (each LoRA alone, the pair)."""
    hot = {n for p in pairs for n in p}
    return plan_variants({n: k for n, k in kinds.items() if n in hot}, gammas, pairs)


def _file_stats(paths: Sequence[Path]) -> list:
    """(path, size, mtime_ns) of every file under the given files / folders: a cheap "unchanged" test that
    lets a LoRA-only export skip loading (and hashing) the base; any change means a full export."""
    out = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def fingerprint(recipe: Recipe, options: ExportOptions, pairs: Sequence[tuple[str, str]]) -> str:
    """Everything a runtime repository's networks depend on, except its runtime LoRAs."""
    hot = {n for p in pairs for n in p}
    body = {"v": FORMAT_VERSION, "base": str(recipe.base), "backbone": str(recipe.backbone or ""),
            "variant": recipe.variant, "config": str(recipe.config or ""), "routing": recipe.routing.as_dict(),
            "defaults": dict(recipe.defaults_table), "engine": dict(recipe.engine_table),
            "hot": [[s.name, s.kind, str(s.path), list(s.gammas)] for s in recipe.loras if s.name in hot],
            "options": [options.runtime, options.precision, options.runner, options.max_rank, sorted(pairs)]}
    sources = [recipe.base] + [p for p in (recipe.backbone, recipe.config) if p]
    sources += [s.path for s in recipe.loras if s.name in hot]
    return stable_hash({"recipe": body, "files": _file_stats(sources)})


@dataclass
class RuntimeSide:
    """The runtime network's layout and every LoRA's checked factors, for one export."""

    layout: RuntimeLayout
    shapes: Mapping[str, tuple[int, ...]]
    routing: object
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # name -> module -> (A, B)
    loras: dict[str, tuple[str, str, int]]  # name -> (kind, sha256, rank)
    fingerprint: str
    records: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> factors, factors_key (once written)
    model: str = rt.RUNTIME_MODEL

    def network_key(self, w_init_key: str, build: Mapping[str, object]) -> str:
        """Content key of the runtime network: W_init, the layout, the build settings (no LoRA)."""
        return stable_hash({"v": FORMAT_VERSION, "network": self.model, "w_init": w_init_key,
                            "layout": self.layout.to_json(), "build": dict(build)})

    def spec(self, unet_spec: NetworkSpec) -> NetworkSpec:
        from .runtime_network import runtime_spec

        return runtime_spec(unet_spec, self.layout)

    def write_factors(self, folder: Path) -> dict[str, list[str]]:
        """Layout files and one factor file per LoRA into ``folder`` (the network's folder); fills :attr:`records`."""
        rt.write_layout_files(folder, self.layout, self.shapes)
        written, kept = [], []
        for name, per_module in self.factors.items():
            kind, sha, rank = self.loras[name]
            key = rt.factors_key(sha, kind, self.routing, self.layout)
            file = f"{name}-{key[:16]}.safetensors"
            (kept if (folder / "loras" / file).is_file() else written).append(name)
            rt.write_factors(folder / "loras", name, key, kind, rank, per_module)
            self.records[name] = {"factors": f"{rt.LORA_FOLDER}/{file}", "factors_key": key}
        return {"written": written, "kept": kept}

    def manifest_section(self) -> dict:
        return rt.runtime_record(self.layout, self.fingerprint)

    def remove_unreferenced(self, out: Path) -> None:
        remove_unreferenced_factors(out, {r["factors"] for r in self.records.values()})


def remove_unreferenced_factors(out: Path, keep: set[str]) -> None:
    """Delete factor files of the repository that the manifest no longer names (after its swap)."""
    folder = out / rt.LORA_FOLDER
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_file() and f"{rt.LORA_FOLDER}/{p.name}" not in keep:
            log.info("removing unreferenced factor file %s", p)
            p.unlink()


def runtime_side(models, lora_files: Mapping[str, dict], options: ExportOptions,
                 pairs: Sequence[tuple[str, str]]) -> RuntimeSide:
    """Layout from the UNet's module shapes, every LoRA checked (a refusal names the LoRA and why)."""
    recipe = models.recipe
    try:
        layout = rt.layout_for(models.shapes, recipe.routing, options.max_rank)
    except RuntimeLoraError as exc:
        raise ExportError(f"{recipe.path}: --lora-mode runtime: {exc}") from exc
    factors, loras = {}, {}
    for name, lora in models.loras.items():
        try:
            factors[name] = runtime_factors(lora.adapter, lora.kind, recipe.routing, layout)
        except RuntimeLoraError as exc:
            raise ExportError(f"{recipe.path}: lora {name!r} ({lora_files[name]['path']}): {exc}") from exc
        loras[name] = (lora.kind, lora_files[name]["sha256"], int(lora.adapter.rank))
    return RuntimeSide(layout, dict(models.shapes), recipe.routing, factors, loras,
                       fingerprint(recipe, options, pairs))
