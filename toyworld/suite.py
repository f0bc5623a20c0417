"""Train everything the benchmark and the demo need on top of a base: W_init and 4 x 4 LoRAs.

Layout of a suite folder::

    ROOT/images/<concept>/*.png         LoRA training images (12 per held-out concept)
    ROOT/refs/content/ ROOT/refs/style/ Rank-FT references (the first 5 images of each concept)
    ROOT/backbone/unet/                 W_init (craft train-backbone output)
    ROOT/loras/<set>/<concept>.safetensors
    ROOT/suite.json                     settings and seconds per stage

``<set>`` is one of :data:`.concepts.LORA_SETS` (``routed_winit``, ``all_w0``, ``routed_w0``,
``all_winit``). Training is deterministic for the settings' seeds on one machine.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .concepts import (
    CONCEPTS,
    LORA_SETS,
    LoraSettings,
    RankFTSettings,
    concept,
    train_concept_lora,
    train_rankft,
    write_concept_images,
    write_references,
)

log = logging.getLogger(__name__)

__all__ = ["SuiteSettings", "Suite", "train_suite"]


@dataclass(frozen=True)
class SuiteSettings:
    images_per_concept: int = 12
    refs_per_concept: int = 5
    lora: LoraSettings = field(default_factory=LoraSettings)
    rankft: RankFTSettings = field(default_factory=RankFTSettings)
    sets: tuple[str, ...] = tuple(LORA_SETS)
    concepts: tuple[str, ...] = tuple(c.name for c in CONCEPTS)

    def __post_init__(self) -> None:
        for s in self.sets:
            if s not in LORA_SETS:
                raise ValueError(f"sets: unknown LoRA set {s!r}; choose from {list(LORA_SETS)}")
        for c in self.concepts:
            concept(c)


@dataclass(frozen=True)
class Suite:
    root: Path

    @property
    def backbone(self) -> Path:
        return self.root / "backbone"

    def images(self, name: str) -> Path:
        return self.root / "images" / name

    def lora(self, lora_set: str, name: str) -> Path:
        return self.root / "loras" / lora_set / f"{name}.safetensors"


def _stage(progress, name: str):
    """The trainers' ``progress(done, total, losses)`` as a stage of ``progress(stage, done, total, losses)``."""
    return None if progress is None else (lambda done, total, losses: progress(name, done, total, losses))


def train_suite(base: Path, root: Path, settings: SuiteSettings = SuiteSettings(), progress=None) -> Suite:
    """Images, references, the Rank-FT backbone (if a set needs it) and every LoRA of ``settings``.

    ``progress(stage, done, total, losses)`` after every optimiser step (stages ``rank-ft``, ``<set>/<concept>``).
    """
    suite, seconds = Suite(Path(root)), {}
    t0 = time.perf_counter()
    # 1. data
    for name in settings.concepts:
        write_concept_images(concept(name), suite.images(name), settings.images_per_concept)
    content_refs, style_refs = write_references(suite.root / "refs", settings.refs_per_concept)
    # 2. W_init
    if any(LORA_SETS[s][1] for s in settings.sets):
        t = time.perf_counter()
        train_rankft(base, content_refs, style_refs, suite.backbone, settings.rankft, _stage(progress, "rank-ft"))
        seconds["rankft"] = time.perf_counter() - t
    # 3. LoRAs
    for lora_set in settings.sets:
        layers, on_winit = LORA_SETS[lora_set]
        for name in settings.concepts:
            t = time.perf_counter()
            train_concept_lora(base, concept(name), suite.images(name), suite.lora(lora_set, name), layers=layers,
                               backbone=suite.backbone if on_winit else None, settings=settings.lora,
                               progress=_stage(progress, f"{lora_set}/{name}"))
            seconds[f"{lora_set}/{name}"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    record = {"base": str(base), "settings": json.loads(json.dumps(asdict(settings), default=str)), "seconds": seconds}
    (suite.root / "suite.json").write_text(json.dumps(record, indent=1))
    return suite
