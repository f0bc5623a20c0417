"""An export as a transaction on a model repository: nothing in REPO changes until every file is written.

Layout while ``craft export`` runs::

    REPO/.craft-staging/models/<name>/   models built (and checked) by this export
    REPO/.craft-staging/manifest.json    the new manifest, written and fsynced before the commit
    REPO/.craft-staging/trash/           folders the commit moved out of REPO, deleted at the end

Staging lives *inside* REPO so that every move of the commit is a rename on one file system, also
when REPO is a mount point (the export job of ``deploy/`` mounts its volume there). ``craft serve``
loads the manifest's models by name, so Triton never looks at the hidden folder.

The commit is renames only (a disk that fills, a corrupt LoRA or a killed process before it leaves
REPO exactly as it was): each new model folder into place (an older folder of the same name is
swapped out in one step, ``renameat2(RENAME_EXCHANGE)``, where the file system allows it, so the
name never points nowhere; elsewhere it moves to the trash first), then ``manifest.json`` - last -
then the models nothing refers to any more move to the trash. A staging folder left by a killed export is removed by the next one, which takes an exclusive
lock on REPO first (two exports into one repository at once are refused).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .manifest_schema import MANIFEST
from .options import ExportError

log = logging.getLogger(__name__)

__all__ = ["STAGING", "KEY_FILE", "RepoTransaction", "folder_key", "is_leftover", "describe_failure",
           "existing_manifest"]

STAGING = ".craft-staging"
#: In every model folder the export builds: the content key it was built for (plan.variant_key...).
KEY_FILE = "craft-key"


def folder_key(folder: Path) -> str | None:
    """The content key a model folder was built for (None: no key file, an older export)."""
    try:
        return (Path(folder) / KEY_FILE).read_text().strip() or None
    except OSError:
        return None


def is_leftover(name: str) -> bool:
    """Entries of REPO that only a failed or killed export leaves behind."""
    return name == STAGING or name.startswith(".old-") or name.startswith(f".{MANIFEST}.")


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the kernel, the
    file system (NFS, ...) or the C library cannot, and the caller renames twice instead."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0
    if not done and ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))
    return done


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(path: Path, data: Mapping[str, Any] | bytes) -> None:
    """The manifest as JSON, or its bytes as given (a copy of another repository keeps its id)."""
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else json.dumps(data, indent=2, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())


class RepoTransaction:
    """``with RepoTransaction(out) as txn``: build into ``txn.stage(name)``, then ``txn.commit(...)``.

    Leaving the block without a commit (an exception, a signal) removes the staging folder and
    leaves REPO as it was (a REPO folder this export created is removed again if still empty).
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.root = self.out / STAGING
        self.models = self.root / "models"
        self.trash = self.root / "trash"
        self._lock_fd: int | None = None
        self._created_out = False
        self.committing = False

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> "RepoTransaction":
        if self.out.exists() and not self.out.is_dir():
            raise ExportError(f"--out {self.out} exists and is not a folder")
        self._created_out = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock()
            self._clear_leftovers()
            self.models.mkdir(parents=True)
        except BaseException:
            self._finish(failed=True)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._finish(failed=exc_type is not None)

    def _lock(self) -> None:
        fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise ExportError(f"--out {self.out}: another craft export is writing this repository; "
                              f"wait for it to finish") from exc
        except OSError as exc:  # e.g. a network file system without flock: go on unlocked
            log.warning("could not lock %s (%s); make sure no other export writes it", self.out, exc)
        self._lock_fd = fd

    def _clear_leftovers(self) -> None:
        """What a killed export left: its staging folder, older exporters' ``.old-*`` folders, temp manifests."""
        for entry in self.out.iterdir():
            if is_leftover(entry.name):
                log.warning("removing %s, left by an export that did not finish", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def _finish(self, failed: bool) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if failed and self._created_out and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- building -------------------------------------------------------------------------------

    def stage(self, name: str) -> Path:
        """Where the model ``name`` is built (the folder itself is created by the builder)."""
        return self.models / name

    def mark(self, name: str, key: str) -> None:
        """Record the content key a staged model was built for (read back by :func:`folder_key`)."""
        (self.stage(name) / KEY_FILE).write_text(key + "\n")

    # -- the commit -------------------------------------------------------------------------------

    def commit(self, names: Iterable[str], manifest: Mapping[str, Any] | bytes, remove: Iterable[str] = ()) -> None:
        """Move the staged models into REPO, swap ``manifest.json`` last, then retire ``remove``.

        ``manifest``: the manifest as a mapping (written as JSON), or the exact bytes to write."""
        names, remove = list(names), list(remove)
        missing = [n for n in names if not self.stage(n).is_dir()]
        if missing:
            raise ExportError(f"internal: models {missing} were never staged")
        # 1. the manifest is written (and fsynced) before anything in REPO moves: a full disk fails here
        staged_manifest = self.root / MANIFEST
        _write_manifest(staged_manifest, manifest)
        for name in names:
            _fsync_dir(self.stage(name))
        self.trash.mkdir(exist_ok=True)
        self.committing = True
        # 2. renames only from here on
        for name in names:  # a folder of the same name is swapped in one step where Linux can
            dest = self.out / name
            if (dest.exists() or dest.is_symlink()) and _exchange(self.stage(name), dest):
                os.replace(self.stage(name), self.trash / name)  # the old folder, now at the staged path
                continue
            if dest.exists() or dest.is_symlink():
                os.replace(dest, self.trash / name)
            os.replace(self.stage(name), dest)
        _fsync_dir(self.out)
        # 3. the manifest, last: a reader sees the old repository or the new one
        os.replace(staged_manifest, self.out / MANIFEST)
        _fsync_dir(self.out)
        # 4. models the new manifest no longer names
        for name in remove:
            dest = self.out / name
            if dest.exists() and name not in names:
                os.replace(dest, self.trash / name)
        shutil.rmtree(self.trash, ignore_errors=True)


def describe_failure(out: Path, exc: OSError, committing: bool) -> str:
    """A user-facing message for a file-system error during an export (a full disk, a read-only volume)."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (free some space, or export to a larger volume)"
    where = f" ({exc.filename})" if exc.filename else ""
    state = ("the export stopped while moving models into place; run it again to finish" if committing
             else "the repository is unchanged")
    return f"--out {out}: {reason}{where}; {state}"


def existing_manifest(out: Path) -> dict | None:
    """The repository's manifest, or None for a new/empty folder; refuse foreign non-empty folders."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExportError(f"{manifest}: unreadable manifest ({exc}); remove the folder to start afresh") from exc
    if any(not is_leftover(p.name) for p in out.iterdir()):
        raise ExportError(f"--out {out} is not empty and holds no {MANIFEST}: refusing to write into it")
    return None
