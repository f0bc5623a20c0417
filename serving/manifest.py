"""Reading ``manifest.json`` defensively: the typed view of a model repository the server runs on.

The file's schema and its writer are :mod:`craft_export.manifest_schema`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft_export.manifest_schema import FORMAT_VERSION, MANIFEST, EngineInfo, LoraRecord
from craft_ops.aggregate import Variant
from craft_ops.request import Defaults, Limits, LoraInfo

__all__ = ["MANIFEST", "PIPELINE_MODELS", "ManifestError", "RepoView", "read_manifest", "parse_manifest", "manifest_id", "inside",
           "check_models"]

#: The models ``craft export`` always writes besides the networks the manifest names.
PIPELINE_MODELS = ("craft_pipeline", "craft_pipeline_stream", "craft_catalog")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class ManifestError(ValueError):
    """A manifest that is missing, from another format version, or inconsistent."""


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths and paths that escape ``root``."""
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or (candidate != root and root not in candidate.parents):
        raise ManifestError(f"path {relative!r} escapes the repository {root}")
    return candidate


def _model_name(field: str, name: Any) -> str:
    """A Triton model name the manifest gives: one plain folder of the repository, nothing else."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise ManifestError(f"{field}: model name {name!r} is not a plain folder name of the repository "
                            f"([A-Za-z0-9_][A-Za-z0-9_.-]*)")
    if name in PIPELINE_MODELS:
        raise ManifestError(f"{field}: {name!r} is a pipeline model, not a network")
    return name


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
    # sha256 (hex) of the manifest.json bytes this view was read from: every pipeline response carries it
    manifest_id: str = ""
    lora_mode: str = "baked"  # "baked" | "runtime" (craft export --lora-mode)
    runtime_model: str | None = None  # runtime mode: the runtime-LoRA network's folder (not a Triton model)

    def model_for(self, variant: Variant) -> str | None:
        return self.variants.get(variant)

    @property
    def unet_model(self) -> str | None:
        """The one Triton model serving every UNet weight set (Python runner), or None: a model per variant."""
        return self.networks.get("unet")

    @property
    def served(self) -> tuple[str, ...]:
        """The Triton models the pipeline calls: the networks, and the UNet variants unless one model serves them."""
        return tuple(sorted({*self.networks.values(), *(() if self.unet_model else self.variants.values())}))

    @property
    def models(self) -> tuple[str, ...]:
        """Every Triton model this repository serves: the pipeline models and :attr:`served`."""
        return tuple(sorted({*PIPELINE_MODELS, *self.served}))

    @property
    def folders(self) -> tuple[str, ...]:
        """Every top-level folder a manifest needs besides its assets': models, weight-only UNet folders."""
        return tuple(sorted({*self.models, *self.variants.values(), *((self.runtime_model,) if self.runtime_model else ())}))


def check_models(view: RepoView) -> None:
    """Every model the manifest names is a folder of the repository with a ``config.pbtxt``."""
    missing = [name for name in view.models if not (view.root / name / "config.pbtxt").is_file()]
    if missing:
        raise ManifestError(f"{view.root / MANIFEST}: models {missing} have no folder with a config.pbtxt "
                            f"in the repository (a half-copied repository? run craft export again)")


def manifest_id(data: bytes) -> str:
    """The id of a manifest: the sha256 of its file's bytes, in hex (``sha256sum manifest.json`` prints it).

    Content-addressed, so every replica reading the same file reports the same id, a re-export that
    changes anything changes it, and a copy made byte for byte (``craft sync``) keeps it."""
    return hashlib.sha256(data).hexdigest()


def read_manifest(root: Path) -> RepoView:
    """Parse and check ``root/manifest.json``."""
    root = Path(root)
    try:
        data = (root / MANIFEST).read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(f"no {MANIFEST} in {root}: not a craft model repository (run craft export)") from exc
    return parse_manifest(root, data)


def parse_manifest(root: Path, data: bytes, path: Path | str | None = None) -> RepoView:
    """Parse and check the bytes of a manifest of the repository at ``root`` (``path``: where they
    came from, for messages; default ``root/manifest.json``)."""
    root = Path(root)
    path = path or root / MANIFEST
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        return _view(root, raw, manifest_id(data))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ManifestError):
            raise ManifestError(f"{path}: {exc}") from exc
        raise ManifestError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def _view(root: Path, raw: Mapping[str, Any], mid: str) -> RepoView:
    if raw["arch"] not in ("sd15", "sdxl"):
        raise ManifestError(f"arch: must be 'sd15' or 'sdxl', got {raw['arch']!r}")
    loras = tuple(LoraRecord.from_json(e) for e in raw["loras"])
    lora_mode = raw.get("lora_mode", "baked")
    if lora_mode not in ("baked", "runtime"):
        raise ManifestError(f"lora_mode: must be 'baked' or 'runtime', got {lora_mode!r}")
    runtime_model = _model_name("runtime_lora.model", raw["runtime_lora"]["model"]) if lora_mode == "runtime" else None
    # runtime mode: any gate in [0, 1] (the runtime network takes it as an input); baked: the baked ones
    catalog = {r.name: LoraInfo(r.name, r.kind, None if lora_mode == "runtime" else r.gammas) for r in loras}
    variants = {_variant(e): _model_name("variants", e["model"]) for e in raw["variants"]}
    d = raw["defaults"]
    defaults = Defaults(
        steps=int(d["steps"]), guidance=float(d["guidance"]), scheduler=d["scheduler"],
        height=int(d["height"]), width=int(d["width"]), mode=d["mode"],
        content_window=tuple(d["content_window"]), style_window=tuple(d["style_window"]),
    )
    engine = EngineInfo.from_json(raw["engine"])
    limits = Limits(min_hw=(engine.min_size, engine.min_size), max_hw=(engine.max_size, engine.max_size),
                    multiple=engine.multiple, max_prompts=engine.max_batch, max_pixels=engine.max_pixels)
    networks = {k: _model_name(f"networks.{k}", v) for k, v in dict(raw["networks"]).items()}
    needed = {"text_encoder", "vae_decoder"} | ({"text_encoder_2"} if raw["arch"] == "sdxl" else set())
    if needed - set(networks):
        raise ManifestError(f"networks: {sorted(needed - set(networks))} missing (got {sorted(networks)})")
    assets = {k: inside(root, v) for k, v in raw["assets"].items()}
    pairs = tuple((p[0], p[1]) for p in raw.get("pairs", []))
    return RepoView(root, raw["arch"], catalog, variants, defaults, limits, networks, assets, pairs, loras, engine,
                    latent_scale=int(raw.get("latent_scale", 8)), latent_channels=int(raw.get("latent_channels", 4)),
                    runtime=raw.get("runtime"), precision=raw.get("precision"), runner=raw.get("runner"),
                    force_zeros_for_empty_prompt=_force_zeros(raw), manifest_id=mid, lora_mode=lora_mode,
                    runtime_model=runtime_model)


def _force_zeros(raw: Mapping[str, Any]) -> bool:
    """The manifest's ``force_zeros_for_empty_prompt``; manifests written before it was recorded get
    diffusers' default for the architecture (SDXL true, SD 1.5 false)."""
    value = raw.get("force_zeros_for_empty_prompt")
    if value is None:
        return raw["arch"] == "sdxl"
    if not isinstance(value, bool):
        raise ManifestError(f"force_zeros_for_empty_prompt must be true or false, got {value!r}")
    return value
