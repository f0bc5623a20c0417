"""Folder operations on a model repository: templates, the pipeline models and their assets, swaps.

Every top-level folder of a Triton repository is a model, so the pipeline's assets (tokenizer(s),
scheduler config) live inside ``craft_pipeline/assets``. Everything is built in the export's staging
folder and moved into place by :class:`craft_export.staging.RepoTransaction`. Assets are copied
without following a symlink out of their source folder (:mod:`.safe_files`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .loading import PipelineParts
from .safe_files import copy_file_confined, copy_tree_confined, link_root

__all__ = ["PIPELINE_MODELS", "ASSETS_MODEL", "templates", "stage_pipeline"]

PIPELINE_MODELS = ("craft_pipeline", "craft_pipeline_stream", "craft_catalog")
ASSETS_MODEL = "craft_pipeline"


def templates() -> Path:
    """The repository's ``model_repository/`` folder (installed as package data)."""
    from importlib.resources import files

    return Path(str(files("craft_model_repository")))


def stage_pipeline(staging: Path, parts: PipelineParts) -> tuple[list[str], dict[str, str]]:
    """Copy the pipeline models into ``staging``, with the tokenizer(s) and scheduler config inside
    ``craft_pipeline/assets``; returns their names and the manifest's ``assets`` (name -> path in REPO)."""
    for name in PIPELINE_MODELS:
        stage = staging / name
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(templates() / name, stage, ignore=shutil.ignore_patterns("__pycache__"))
        if name == ASSETS_MODEL:
            assets = _copy_assets(parts, stage / "assets")
    return list(PIPELINE_MODELS), {k: f"{ASSETS_MODEL}/assets/{v}" for k, v in assets.items()}


def _copy_assets(parts: PipelineParts, folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    assets = {}
    root = link_root(parts.path)
    for name in (["tokenizer", "tokenizer_2"] if parts.arch == "sdxl" else ["tokenizer"]):
        copy_tree_confined(parts.path / name, folder / name, root)
        assets[name] = name
    copy_file_confined(parts.path / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json", root)
    assets["scheduler_config"] = "scheduler_config.json"
    return assets
