"""Train everything the benchmark and the demo need on top of a base: W_init and 4 x 4 LoRAs.

Layout of a suite folder::

    ROOT/images/<concept>/*.png         LoRA training images (12 per held-out concept)
    ROOT/refs/content/ ROOT/refs/style/ Rank-FT references (the first 5 images of each concept)
    ROOT/backbone/unet/                 W_init (craft train-backbone output)
    ROOT/loras/<set>/<concept>.safetensors
    ROOT/suite.json                     settings and seconds per stage

``<set>`` is one of :data:`.concepts.LORA_SETS` (``routed_winit``, ``all_w0``, ``routed_w0``,
``all_winit``). Training is deterministic for the settings' seeds on one machine.

``workers`` > 1 trains that many jobs at once in spawned processes of one torch thread each
(the W0 LoRAs run beside Rank-FT; the W_init LoRAs start when W_init exists). On a shared
2-core machine two one-thread processes are several times faster than one two-thread
process. Each job's result depends only on its own settings and seed, not on the schedule;
progress is reported only when everything runs in this process (``workers=1``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
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
    workers: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers: must be an integer >= 1, got {self.workers!r}")
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


def _timed(fn, *args, **kwargs) -> float:
    """Run one training job (in a worker: one torch thread) and return its seconds."""
    import torch

    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


class _Inline:
    """The executor interface, running each job at once in this process."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def train_suite(base: Path, root: Path, settings: SuiteSettings = SuiteSettings(), progress=None) -> Suite:
    """Images, references, the Rank-FT backbone (if a set needs it) and every LoRA of ``settings``.

    ``progress(stage, done, total, losses)`` after every optimiser step (stages ``rank-ft``,
    ``<set>/<concept>``) when ``settings.workers == 1``.
    """
    suite = Suite(Path(root))
    t0 = time.perf_counter()
    inline = settings.workers == 1
    # 1. data
    for name in settings.concepts:
        write_concept_images(concept(name), suite.images(name), settings.images_per_concept)
    content_refs, style_refs = write_references(suite.root / "refs", settings.refs_per_concept)

    def lora_jobs(on_winit: bool) -> list[tuple[str, tuple, dict]]:
        jobs = []
        for lora_set in settings.sets:
            layers, needs_winit = LORA_SETS[lora_set]
            if needs_winit != on_winit:
                continue
            for name in settings.concepts:
                key = f"{lora_set}/{name}"
                jobs.append((key, (train_concept_lora, base, concept(name), suite.images(name), suite.lora(lora_set, name)),
                             {"layers": layers, "backbone": suite.backbone if on_winit else None,
                              "settings": settings.lora, "progress": _stage(progress, key) if inline else None}))
        return jobs

    pool = _Inline() if inline else ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("spawn"))
    with pool:
        # 2. W_init, with the W0 LoRAs beside it
        futures: dict[str, Future] = {}
        if any(LORA_SETS[s][1] for s in settings.sets):
            futures["rankft"] = pool.submit(_timed, train_rankft, base, content_refs, style_refs, suite.backbone,
                                            settings.rankft, _stage(progress, "rank-ft") if inline else None)
        for key, args, kwargs in lora_jobs(on_winit=False):
            futures[key] = pool.submit(_timed, *args, **kwargs)
        if "rankft" in futures:
            futures["rankft"].result()
        # 3. the LoRAs on W_init
        for key, args, kwargs in lora_jobs(on_winit=True):
            futures[key] = pool.submit(_timed, *args, **kwargs)
        seconds = {key: f.result() for key, f in futures.items()}
    seconds["total"] = time.perf_counter() - t0
    record = {"base": str(base), "settings": json.loads(json.dumps(asdict(settings), default=str)), "seconds": seconds}
    (suite.root / "suite.json").write_text(json.dumps(record, indent=1))
    return suite
