"""Reading ``manifest.json`` defensively: the typed view of a model repository the server runs on.

The file's schema and its writer are :mod:`craft_export.manifest_schema`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft_export.manifest_schema import FORMAT_VERSION, MANIFEST, EngineInfo, LoraRecord
from craft_ops.aggregate import Variant
from craft_ops.request import Defaults, Limits, LoraInfo

__all__ = ["MANIFEST", "ManifestError", "RepoView", "read_manifest", "inside"]


class ManifestError(ValueError):
    """A manifest that is missing, from another format version, or inconsistent."""


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths and paths that escape ``root``."""
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or (candidate != root and root not in candidate.parents):
        raise ManifestError(f"path {relative!r} escapes the repository {root}")
    return candidate


def _variant(entry: Mapping[str, Any]) -> Variant:
    return Variant(entry.get("content"), float(entry.get("gamma_c", 0.0)), entry.get("style"), float(entry.get("gamma_s", 0.0)))


@dataclass(frozen=True)
class RepoView:
    """The parts of a manifest the serving side needs, validated once."""

    root: Path
    arch: str
    catalog: Mapping[str, LoraInfo]
    variants: Mapping[Variant, str]  # weights -> Triton model name
    defaults: Defaults
    limits: Limits
    networks: Mapping[str, str]  # "text_encoder", "text_encoder_2", "vae_decoder" -> model name
    assets: Mapping[str, Path]  # "tokenizer", "tokenizer_2", "scheduler_config" -> file/folder
    pairs: tuple[tuple[str, str], ...]
    loras: tuple[LoraRecord, ...]
    engine: EngineInfo
    latent_scale: int
    latent_channels: int
    runtime: str | None  # "onnxruntime" | "tensorrt"
    precision: str | None
    runner: str | None  # "native" | "python"
    # SDXL: an empty negative prompt gives zero unconditional embeddings (the checkpoint's setting)
    force_zeros_for_empty_prompt: bool = False

    def model_for(self, variant: Variant) -> str | None:
        return self.variants.get(variant)


def read_manifest(root: Path) -> RepoView:
    """Parse and check ``root/manifest.json``."""
    root = Path(root)
    path = root / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"no {MANIFEST} in {root}: not a craft model repository (run craft export)") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if raw.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        return _view(root, raw)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def _view(root: Path, raw: Mapping[str, Any]) -> RepoView:
    loras = tuple(LoraRecord.from_json(e) for e in raw["loras"])
    catalog = {r.name: LoraInfo(r.name, r.kind, r.gammas) for r in loras}
    variants = {_variant(e): e["model"] for e in raw["variants"]}
    d = raw["defaults"]
    defaults = Defaults(
        steps=int(d["steps"]), guidance=float(d["guidance"]), scheduler=d["scheduler"],
        height=int(d["height"]), width=int(d["width"]), mode=d["mode"],
        content_window=tuple(d["content_window"]), style_window=tuple(d["style_window"]),
    )
    engine = EngineInfo.from_json(raw["engine"])
    limits = Limits(min_hw=(engine.min_size, engine.min_size), max_hw=(engine.max_size, engine.max_size),
                    multiple=engine.multiple, max_prompts=engine.max_batch)
    networks = dict(raw["networks"])
    assets = {k: inside(root, v) for k, v in raw["assets"].items()}
    pairs = tuple((p[0], p[1]) for p in raw.get("pairs", []))
    for name in list(variants.values()) + list(networks.values()):
        inside(root, name)
    return RepoView(root, raw["arch"], catalog, variants, defaults, limits, networks, assets, pairs, loras, engine,
                    latent_scale=int(raw.get("latent_scale", 8)), latent_channels=int(raw.get("latent_channels", 4)),
                    runtime=raw.get("runtime"), precision=raw.get("precision"), runner=raw.get("runner"),
                    force_zeros_for_empty_prompt=_force_zeros(raw))


def _force_zeros(raw: Mapping[str, Any]) -> bool:
    """The manifest's ``force_zeros_for_empty_prompt``; manifests written before it was recorded get
    diffusers' default for the architecture (SDXL true, SD 1.5 false)."""
    value = raw.get("force_zeros_for_empty_prompt")
    if value is None:
        return raw["arch"] == "sdxl"
    if not isinstance(value, bool):
        raise ManifestError(f"force_zeros_for_empty_prompt must be true or false, got {value!r}")
    return value
