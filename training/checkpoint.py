"""Rank-FT checkpoints: ``OUT/checkpoint/`` with the raw bases, optimiser and grad-scaler state,
RNG states, the step and the log so far, written atomically; resuming checks that the settings
that shape training are the same.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import TrainError

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint"]

CHECKPOINT = "checkpoint"


def save_checkpoint(out: Path, trainer, step: int, record: Mapping) -> None:
    """``OUT/checkpoint/``: bases, optimizer + scaler state, RNG states, step and log (atomic)."""
    from safetensors.torch import save_file

    tmp, final = out / f"{CHECKPOINT}.tmp", out / CHECKPOINT
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainer.bases.raw_state(), str(tmp / "bases.safetensors"))
    optimizer = {"optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict()}
    torch.save(optimizer, tmp / "optimizer.pt")
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng = {"generator": trainer.generator.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}
    torch.save(rng, tmp / "rng.pt")
    state = {"step": step, "fingerprint": trainer.config.fingerprint(), "record": record}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_checkpoint(out: Path, trainer) -> tuple[int, dict] | None:
    """Restore a trainer from ``OUT/checkpoint``; ``None`` when there is none."""
    from safetensors.torch import load_file

    folder = out / CHECKPOINT
    if not (folder / "state.json").is_file():
        return None
    try:
        state = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "bases.safetensors"))
        opt = torch.load(folder / "optimizer.pt", weights_only=True)
        rng = torch.load(folder / "rng.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TrainError(f"--resume: cannot read checkpoint {folder}: {exc}") from exc
    _check_fingerprint(folder, state.get("fingerprint", {}), trainer.config.fingerprint())
    trainer.bases.load_raw_state({k: v.to(trainer.device) for k, v in tensors.items()})
    trainer.optimizer.load_state_dict(opt["optimizer"])
    trainer.scaler.load_state_dict(opt["scaler"])
    trainer.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"]), state["record"]


def _check_fingerprint(folder: Path, saved: Mapping, current: Mapping) -> None:
    diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
             if saved.get(k) != current.get(k)]
    if diffs:
        raise TrainError(f"--resume: checkpoint {folder} was written with other settings ({'; '.join(diffs)})")
