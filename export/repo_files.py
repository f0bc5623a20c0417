"""Folder operations on a model repository: templates, the pipeline models and their assets, swaps.

Every top-level folder of a Triton repository is a model, so the pipeline's assets (tokenizer(s),
scheduler config) live inside ``craft_pipeline/assets``. Finished folders are moved into place
with renames, so a running server never sees a half-written model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .loading import PipelineParts

__all__ = ["STAGING", "PIPELINE_MODELS", "ASSETS_MODEL", "templates", "install_pipeline", "swap_in"]

STAGING = ".craft-staging"
PIPELINE_MODELS = ("craft_pipeline", "craft_pipeline_stream", "craft_catalog")
ASSETS_MODEL = "craft_pipeline"


def templates() -> Path:
    """The repository's ``model_repository/`` folder (installed as package data)."""
    from importlib.resources import files

    return Path(str(files("craft_model_repository")))


def install_pipeline(out: Path, staging: Path, parts: PipelineParts) -> dict[str, str]:
    """Copy the pipeline models into ``out``, with the tokenizer(s) and scheduler config inside
    ``craft_pipeline/assets``; returns the manifest's ``assets`` (name -> path in the repository)."""
    for name in PIPELINE_MODELS:
        stage = staging / name
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(templates() / name, stage, ignore=shutil.ignore_patterns("__pycache__"))
        if name == ASSETS_MODEL:
            assets = _copy_assets(parts, stage / "assets")
        swap_in(stage, out / name)
    return {k: f"{ASSETS_MODEL}/assets/{v}" for k, v in assets.items()}


def _copy_assets(parts: PipelineParts, folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    assets = {}
    for name in (["tokenizer", "tokenizer_2"] if parts.arch == "sdxl" else ["tokenizer"]):
        shutil.copytree(parts.path / name, folder / name)
        assets[name] = name
    shutil.copy(parts.path / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")
    assets["scheduler_config"] = "scheduler_config.json"
    return assets


def swap_in(stage: Path, dest: Path) -> None:
    """Move a finished folder into place; an older one is moved aside first, then deleted."""
    old = dest.with_name(f".old-{dest.name}")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(stage, dest)
    shutil.rmtree(old, ignore_errors=True)
