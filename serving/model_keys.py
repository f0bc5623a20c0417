"""Reload a model that a re-export rebuilt under the same name.

A re-export that rebuilds a model without renaming it (a LoRA file replaced under the same LoRA
name, a new backbone for the same recipe) swaps the model's folder, ``craft-key`` included, but
the model name stays, so "load what is not loaded yet" leaves Triton serving the old files. This
ledger remembers the ``craft-key`` each model was last loaded with and loads a model again when
its folder's key differs (Triton's load of a loaded model reloads it; the old version keeps
serving until the new one is ready).

The pipeline models of one server (several instances, plain and streaming) share the ledger
through files under ``$CRAFT_RUN_DIR/loaded-keys`` with a lock, so one change costs one reload,
not one per instance; without ``$CRAFT_RUN_DIR`` (tritonserver started by hand) each instance
keeps its own ledger in memory.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from craft_export.staging import folder_key

from .shutdown import ENV_RUN_DIR

__all__ = ["LoadedKeys"]

LEDGER = "loaded-keys"


class LoadedKeys:
    """The ``craft-key`` every model of a repository was last (re)loaded with."""

    def __init__(self, repo: Path, run_dir: str | os.PathLike | None = None):
        self.repo = Path(repo)
        run_dir = os.environ.get(ENV_RUN_DIR) if run_dir is None else run_dir
        self._dir = Path(run_dir) / LEDGER if run_dir else None
        self._memory: dict[str, str] = {}
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self):
        if self._dir is None:
            yield
            return
        with open(self._dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _recorded(self, name: str) -> str | None:
        if self._dir is None:
            return self._memory.get(name)
        try:
            return (self._dir / name).read_text().strip() or None
        except FileNotFoundError:
            return None

    def _record(self, name: str, key: str) -> None:
        if self._dir is None:
            self._memory[name] = key
            return
        tmp = self._dir / f".{name}.tmp"
        tmp.write_text(key + "\n")
        os.replace(tmp, self._dir / name)

    def note(self, names: Iterable[str]) -> None:
        """Record the current key of every model not recorded yet (the models as the server loaded them)."""
        with self._locked():
            for name in names:
                key = folder_key(self.repo / name)
                if key is not None and self._recorded(name) is None:
                    self._record(name, key)

    def loaded(self, name: str) -> None:
        """``name`` was just loaded from its folder as it is now."""
        key = folder_key(self.repo / name)
        if key is not None:
            with self._locked():
                self._record(name, key)

    def reload_if_rebuilt(self, pb, name: str) -> bool:
        """Load ``name`` again if its folder's key is not the one it was loaded with; True if it was."""
        key = folder_key(self.repo / name)
        if key is None:  # a repository written before craft-key files: nothing to compare
            return False
        with self._locked():
            recorded = self._recorded(name)
            if recorded == key:
                return False
            if recorded is not None:
                pb.load_model(model_name=name)
            self._record(name, key)
            return recorded is not None
