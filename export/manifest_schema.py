"""``manifest.json``: what a model repository holds, and its typed records.

The exporter writes it last (after every model it names is in place, :mod:`.staging`); the server reads only
this file (:func:`craft_serving.manifest.read_manifest`) to learn the architecture, the LoRA
catalogue, which Triton model holds which weight variant, the request defaults and the size
limits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from craft_ops.aggregate import Variant
from craft_ops.request import Defaults
from craft_ops.routing import Routing

from .plan import FORMAT_VERSION

__all__ = ["MANIFEST", "FORMAT_VERSION", "LoraRecord", "EngineInfo", "variant_record", "manifest_json"]

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class LoraRecord:
    """One LoRA of the repository: what a client may ask for, and where it came from."""

    name: str
    kind: str  # "content" | "style"
    gammas: tuple[float, ...]  # baked gate values
    path: str = ""
    sha256: str = ""
    format: str = ""  # "peft" | "diffusers-legacy" | "kohya"
    rank: int = 0
    coverage: Mapping[str, int] = field(default_factory=dict)  # module counts: modules, content, style, routed
    factors: str = ""  # runtime mode: the factor file, relative to the repository
    factors_key: str = ""  # runtime mode: its content key

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "gammas": list(self.gammas), "path": self.path,
               "sha256": self.sha256, "format": self.format, "rank": self.rank, "coverage": dict(self.coverage)}
        if self.factors:
            out.update(factors=self.factors, factors_key=self.factors_key)
        return out

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> "LoraRecord":
        return cls(entry["name"], entry["kind"], tuple(float(g) for g in entry["gammas"]), entry.get("path", ""),
                   entry.get("sha256", ""), entry.get("format", ""), int(entry.get("rank", 0)),
                   dict(entry.get("coverage", {})), entry.get("factors", ""), entry.get("factors_key", ""))


@dataclass(frozen=True)
class EngineInfo:
    """Image sizes (pixels, square bounds) and batch sizes the repository's engines take."""

    min_size: int
    opt_size: int
    max_size: int
    max_batch: int
    multiple: int = 8
    max_pixels: int = 0  # prompts x height x width of one request; 0: max_batch x max_size^2

    def __post_init__(self) -> None:
        if not self.max_pixels:
            object.__setattr__(self, "max_pixels", self.max_batch * self.max_size ** 2)

    def to_json(self) -> dict[str, int]:
        return {"min_size": self.min_size, "opt_size": self.opt_size, "max_size": self.max_size,
                "max_batch": self.max_batch, "multiple": self.multiple, "max_pixels": self.max_pixels}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> "EngineInfo":
        return cls(int(entry["min_size"]), int(entry.get("opt_size", entry["min_size"])), int(entry["max_size"]),
                   int(entry["max_batch"]), int(entry.get("multiple", 8)), int(entry.get("max_pixels", 0)))


def variant_record(v: Variant, model: str) -> dict[str, Any]:
    return {"content": v.content, "gamma_c": v.gamma_c, "style": v.style, "gamma_s": v.gamma_s, "model": model}


def manifest_json(*, arch: str, base: Path, backbone: Path | None, routing: Routing, runtime: str, precision: str,
                  runner: str, latent_scale: int, latent_channels: int, loras: Sequence[LoraRecord],
                  pairs: Sequence[tuple[str, str]], variants: Sequence[Mapping[str, Any]],
                  networks: Mapping[str, str], models: Mapping[str, Mapping[str, Any]], assets: Mapping[str, str],
                  defaults: Defaults, engine: EngineInfo, force_zeros_for_empty_prompt: bool = False,
                  lora_mode: str = "baked", runtime_lora: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a repository, as written (``models``: each model's export record).

    ``force_zeros_for_empty_prompt``: the SDXL checkpoint's ``model_index.json`` setting (diffusers'
    default true; always false for SD 1.5), which the served pipeline applies to an empty negative prompt.
    ``lora_mode`` / ``runtime_lora``: ``craft export --lora-mode runtime`` (:mod:`.runtime_export`).
    """
    return {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "base": str(base),
        "backbone": str(backbone) if backbone else None,
        "routing": routing.as_dict(),
        "runtime": runtime, "precision": precision, "runner": runner,
        "latent_scale": latent_scale, "latent_channels": latent_channels,
        "force_zeros_for_empty_prompt": bool(force_zeros_for_empty_prompt),
        "loras": [lora.to_json() for lora in loras],
        "pairs": [list(p) for p in pairs],
        "variants": list(variants),
        "networks": dict(networks),
        "models": dict(models),
        "assets": dict(assets),
        "defaults": defaults.as_dict(),
        "engine": engine.to_json(),
        "lora_mode": lora_mode,
        **({"runtime_lora": dict(runtime_lora)} if runtime_lora else {}),
    }
