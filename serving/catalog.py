"""``craft_catalog``: the served LoRAs, pairs, defaults and limits as JSON, from the last good manifest.

When ``manifest.json`` on disk was refused (a hand edit, a half-copied repository), the catalogue
still describes the manifest in service and says why the file on disk is not
(``"manifest": {"status": "rejected", "reason": ...}``); ``craft models`` prints that reason.
``manifest_id`` is the id of the manifest in service, the one its pipeline responses carry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import RepoView, read_manifest
from .manifest_watch import ManifestWatch, stamp_of

__all__ = ["catalog", "CatalogModel"]


def catalog(repo: Path | RepoView) -> dict:
    """The client-facing part of a manifest: LoRAs, pairs, defaults, limits."""
    view = repo if isinstance(repo, RepoView) else read_manifest(repo)
    return {
        "arch": view.arch,
        "loras": [{"name": r.name, "kind": r.kind, "gammas": list(r.gammas), "rank": r.rank, "format": r.format,
                   "sha256": r.sha256, "coverage": dict(r.coverage)} for r in view.loras],
        "pairs": [list(p) for p in view.pairs],
        "defaults": dict(sorted(view.defaults.as_dict().items())),  # key order as in manifest.json
        "engine": dict(sorted(view.engine.to_json().items())),
        "runtime": view.runtime,
        "precision": view.precision,
        "manifest_id": view.manifest_id,  # what every pipeline response of this manifest carries
    }


class CatalogModel:
    """Answers every request with the catalogue of the manifest in service, and its status."""

    def __init__(self, pb_utils, args: dict[str, str]):
        self.pb = pb_utils
        repo = Path(args["model_repository"]).resolve().parent
        stamp = stamp_of(repo)  # taken before reading: a replacement in between is read next time
        self.watch: ManifestWatch[dict] = ManifestWatch(repo, catalog(repo), stamp, pb_utils.Logger.log_warn)

    def _text(self) -> bytes:
        body = dict(self.watch.refresh(catalog))
        reason = self.watch.reason
        body["manifest"] = {"status": "rejected", "reason": reason} if reason else {"status": "ok"}
        return json.dumps(body).encode()

    def execute(self, requests: list[Any]):
        out = np.array([self._text()], dtype=np.object_)
        return [self.pb.InferenceResponse(output_tensors=[self.pb.Tensor("catalog", out)]) for _ in requests]
