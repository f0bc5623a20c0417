"""A running server's view of ``manifest.json``: the last good one, and why a newer one was refused.

``craft export`` replaces the manifest atomically; a hand edit may not. Each Python model that
reads the manifest (the pipelines, the catalogue) keeps a :class:`ManifestWatch`: a cheap ``stat``
tells whether the file changed; a changed file is read, checked (schema, model names inside the
repository, every model folder present) and its models loaded through Triton's in-process API.
Any failure keeps the last good manifest in service and records the reason, which the catalogue
returns (``craft models`` prints it) and the server log shows. A rejected file is not read again
until it changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from .manifest import MANIFEST, ManifestError, RepoView, check_models, read_manifest

__all__ = ["Stamp", "stamp_of", "ManifestWatch", "load_missing"]

T = TypeVar("T")
Stamp = tuple[int, int]


def stamp_of(repo: Path) -> Stamp:
    """Identity of the current ``manifest.json`` (mtime, inode): a replaced or edited file differs."""
    stat = (Path(repo) / MANIFEST).stat()
    return stat.st_mtime_ns, stat.st_ino


def load_missing(pb, view: RepoView, keys=None) -> None:
    """Load the manifest's networks the server has not loaded yet (explicit model control, through
    Triton's in-process API, which the admin-key restriction of the endpoints does not cover).

    A model that does not load rejects the whole manifest (:class:`ManifestError`). With ``keys``
    (:class:`.model_keys.LoadedKeys`) a loaded model whose folder a re-export rebuilt under the same
    name is loaded again.
    """
    failed = []
    for name in view.served:
        try:
            if not pb.is_model_ready(model_name=name):
                pb.load_model(model_name=name)
                if keys is not None:
                    keys.loaded(name)
            elif keys is not None:
                keys.reload_if_rebuilt(pb, name)
        except Exception as exc:  # noqa: BLE001 - Triton raises its own exception types here
            failed.append(f"{name} ({exc})")
    if failed:
        raise ManifestError(f"models that did not load: {'; '.join(failed)}")


class ManifestWatch(Generic[T]):
    """The value built from the last good manifest (a pipeline runtime, a catalogue), kept in service."""

    def __init__(self, repo: Path, current: T, stamp: Stamp, warn: Callable[[str], None]):
        self.repo = Path(repo)
        self.current = current
        self.stamp = stamp
        self._warn = warn
        self.rejected: tuple[Stamp | None, str] | None = None  # (stamp of the refused file, why)

    @property
    def reason(self) -> str | None:
        """Why the file on disk is not the one in service (None: it is)."""
        return self.rejected[1] if self.rejected else None

    def _stamp(self) -> Stamp | None:
        try:
            return stamp_of(self.repo)
        except OSError as exc:
            self._reject(None, f"{self.repo / MANIFEST} unreadable ({exc.strerror or exc})")
            return None

    def _reject(self, stamp: Stamp | None, reason: str) -> None:
        if self.rejected != (stamp, reason):
            self._warn(f"craft: manifest rejected, serving the last good one: {reason}")
        self.rejected = (stamp, reason)

    def changed(self) -> bool:
        """A cheap check: the file differs from the one in service and from the last one refused."""
        stamp = self._stamp()
        return stamp is not None and stamp != self.stamp and (self.rejected is None or stamp != self.rejected[0])

    def refresh(self, build: Callable[[RepoView], T]) -> T:
        """Read a changed manifest and build from it, or keep the current value and record why not."""
        if not self.changed():
            if self._stamp() == self.stamp:
                self.rejected = None  # the good file is back (or was never replaced)
            return self.current
        stamp = self._stamp()
        try:
            view = read_manifest(self.repo)
            check_models(view)
            value = build(view)
        except (ManifestError, OSError, ValueError) as exc:
            self._reject(stamp, str(exc))
            return self.current
        self.current, self.stamp, self.rejected = value, stamp, None
        return value
