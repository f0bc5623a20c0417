"""Scores of generated images against a (content, style) target, with 95 % intervals.

Per image: ``content_score`` = P(target shape) from the shape judge, ``style_score`` =
P(target style) from the style judge, ``content_correct`` / ``style_correct`` = the judge's
top-1 is the target, ``both_correct`` = both are, ``content_sim`` / ``style_sim`` = cosine of
the judge's penultimate features to the mean feature of the concept's LoRA training images
(the CLIP-I analogue). Summaries give the mean and a 95 % interval: normal approximation
(mean +- 1.96 sd / sqrt(n)) for scores, Wilson's interval for rates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .judges import Judges, load_folder
from .world import SHAPES, STYLES

__all__ = ["reference_features", "score_images", "summarise", "mean_ci", "wilson", "METRICS"]

METRICS = ("content_score", "style_score", "both_correct", "content_correct", "style_correct",
           "content_sim", "style_sim")
_RATES = {"both_correct", "content_correct", "style_correct"}


def reference_features(judges: Judges, folder: Path, kind: str) -> torch.Tensor:
    """Mean penultimate feature (128,) of a LoRA's training images, for the judge of ``kind``."""
    v = judges(load_folder(folder)[1])
    feats = v.shape_features if kind == "content" else v.style_features
    return feats.mean(0)


def _cos(feats: torch.Tensor, ref: torch.Tensor | None) -> list[float | None]:
    if ref is None:
        return [None] * feats.shape[0]
    return torch.nn.functional.cosine_similarity(feats, ref[None], dim=-1).tolist()


def score_images(judges: Judges, images: np.ndarray, shape: str, style: str,
                 content_ref: torch.Tensor | None = None, style_ref: torch.Tensor | None = None) -> dict[str, list]:
    """Per-image metrics of ``images`` (N, 64, 64, 3) uint8 for the target ``shape`` / ``style``."""
    v = judges(images)
    si, ti = SHAPES.index(shape), STYLES.index(style)
    c_ok = (v.shape_probs.argmax(-1) == si).tolist()
    s_ok = (v.style_probs.argmax(-1) == ti).tolist()
    return {
        "content_score": v.shape_probs[:, si].tolist(), "style_score": v.style_probs[:, ti].tolist(),
        "content_correct": [float(x) for x in c_ok], "style_correct": [float(x) for x in s_ok],
        "both_correct": [float(a and b) for a, b in zip(c_ok, s_ok)],
        "content_sim": _cos(v.shape_features, content_ref), "style_sim": _cos(v.style_features, style_ref),
        "predicted_shape": [r["shape"] for r in v.records()], "predicted_style": [r["style"] for r in v.records()],
    }


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    x = np.asarray(values, dtype=float)
    n = len(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": float(x.mean()), "ci95": [float(x.mean() - half), float(x.mean() + half)], "n": n}


def wilson(values: Sequence[float]) -> dict[str, float]:
    n, k = len(values), float(np.sum(values))
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"mean": p, "ci95": [centre - half, centre + half], "n": n}


def summarise(per_image: Mapping[str, Sequence]) -> dict[str, dict]:
    """Mean and 95 % interval of every metric (``None`` values - no reference - are skipped)."""
    out = {}
    for key in METRICS:
        values = [v for v in per_image.get(key, []) if v is not None]
        if values:
            out[key] = wilson(values) if key in _RATES else mean_ci(values)
    return out
