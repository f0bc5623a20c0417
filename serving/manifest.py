"""``manifest.json``: what a model repository holds, written atomically and read defensively.

The server reads only this file to learn the architecture, the LoRA catalogue, which
Triton model holds which weight variant, the request defaults and the size limits.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft_ops.aggregate import Variant
from craft_ops.request import Defaults, Limits, LoraInfo

from craft_export.plan import FORMAT_VERSION

__all__ = ["ManifestError", "RepoView", "read_manifest", "write_json_atomic", "inside"]

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A manifest that is missing, from another format version, or inconsistent."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to ``path`` and rename over it: readers see the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    raw: Mapping[str, Any]

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
        catalog = {
            e["name"]: LoraInfo(e["name"], e["kind"], tuple(float(g) for g in e["gammas"]))
            for e in raw["loras"]
        }
        variants = {_variant(e): e["model"] for e in raw["variants"]}
        d = raw["defaults"]
        defaults = Defaults(
            steps=int(d["steps"]), guidance=float(d["guidance"]), scheduler=d["scheduler"],
            height=int(d["height"]), width=int(d["width"]), mode=d["mode"],
            content_window=tuple(d["content_window"]), style_window=tuple(d["style_window"]),
        )
        e = raw["engine"]
        limits = Limits(min_hw=(e["min_size"], e["min_size"]), max_hw=(e["max_size"], e["max_size"]),
                        multiple=int(e.get("multiple", 8)), max_prompts=int(e["max_batch"]))
        networks = dict(raw["networks"])
        assets = {k: inside(root, v) for k, v in raw["assets"].items()}
        pairs = tuple((p[0], p[1]) for p in raw.get("pairs", []))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc
    for name in list(variants.values()) + list(networks.values()):
        inside(root, name)
    return RepoView(root, raw["arch"], catalog, variants, defaults, limits, networks, assets, pairs, raw)
