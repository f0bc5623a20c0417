"""``train``: the base model and the judges, from nothing, in one deterministic run.

Writes ``OUT/base/`` (fp16 diffusers folder + ``train_log.json``), ``OUT/judges.safetensors``
and ``OUT/judges_log.json`` (training log and accuracy on 1000 fresh renders). Torch runs
with ``OMP_NUM_THREADS`` threads (default 2, the CI machine's cores). The judges depend only
on the seed and the base's VAE, so :func:`train_judges_for` on a trained base gives the same
judges as the whole run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from .judges import JudgeTrainConfig, accuracy, render_pool, train_judges
from .train_base import BaseTrainConfig, StageProgress, train_base

__all__ = ["train_world", "train_judges_for", "QUICK"]

# A smoke test of the whole command (seconds, not a usable model).
QUICK = dict(images=64, vae_steps=3, unet_steps=3, vae_batch=4, unet_batch=4)


def _threads() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def train_judges_for(base: Path, out: Path, *, seed: int = 0, quick: bool = False, steps: int | None = None,
                     progress: StageProgress | None = None) -> Path:
    """Judges trained with the VAE round trips of ``base``; writes ``out`` and ``judges_log.json`` beside it."""
    from diffusers import AutoencoderKL

    _threads()
    t0, c0 = time.perf_counter(), time.process_time()
    vae = AutoencoderKL.from_pretrained(Path(base) / "vae", torch_dtype=torch.float32).eval()
    config = JudgeTrainConfig(seed=seed, **({"pool": 64, "steps": 3, "batch": 8} if quick else {}))
    if steps is not None:
        config = replace(config, steps=steps)
    monitor = render_pool(seed + 99991, 16 if quick else 300)  # neither the training pool nor the final check
    judges, log = train_judges(config, vae, progress, monitor)
    out = Path(out)
    judges.save(out)
    log["accuracy_fresh_renders"] = accuracy(judges, seed + 424242, 100 if quick else 1000)
    log["seconds_with_accuracy"] = time.perf_counter() - t0
    log["cpu_seconds_with_accuracy"] = time.process_time() - c0  # all threads; wall on an idle core at 1 thread
    log["threads"] = torch.get_num_threads()
    log["load_average_end"] = list(os.getloadavg())
    out.with_name("judges_log.json").write_text(json.dumps(log, indent=1))
    return out


def train_world(out: Path, *, seed: int = 0, quick: bool = False, unet_steps: int | None = None,
                vae_steps: int | None = None, judge_steps: int | None = None,
                progress: StageProgress | None = None) -> Path:
    """Base (``OUT/base``) then judges (``OUT/judges.safetensors``)."""
    _threads()
    out = Path(out)
    config = BaseTrainConfig(out=out / "base", seed=seed, **(QUICK if quick else {}))
    overrides = {k: v for k, v in (("unet_steps", unet_steps), ("vae_steps", vae_steps)) if v is not None}
    train_base(replace(config, **overrides), progress)
    train_judges_for(out / "base", out / "judges.safetensors", seed=seed, quick=quick, steps=judge_steps,
                     progress=progress)
    return out
