"""``craft sync``: keep a local copy of a model repository that lives in object storage (or another folder).

``craft serve`` and the pipeline models read the repository from a local folder (``manifest.json``
beside the model folders). Where the repository lives in S3-compatible storage, a sync process
(an init container, then a sidecar, in ``deploy/cloud``) keeps such a folder up to date with the
same guarantee ``craft export`` gives a folder it writes: a reader sees the old repository or the
new one, never a half-copied model.

One round (:func:`sync_once`):

1. read the store's ``manifest.json``; the same bytes as the local one: nothing to do;
2. parse and check it (the serving side's own checks: plain model names, assets inside the
   repository), and find the model folders it needs;
3. list the needed folders: an object written after the manifest means the upload of a later
   export is under way (uploads write the manifest last), and the round waits for it;
4. under the repository's export lock, download every needed folder whose objects differ from the
   local copy (each local folder records the tags of the objects it was copied from in
   ``craft-sync``) into ``REPO/.craft-staging`` on the same file system; a model's ``craft-key``
   (the content key its export built it for) must be the one the manifest records;
5. read the store's manifest and the listings of the downloaded folders again: anything changed
   (an upload that started during the round) drops the round, which the next one repeats;
6. commit as an export does (:class:`craft_export.staging.RepoTransaction`): each new folder
   renamed into place, then ``manifest.json`` (byte for byte, so its id is the store's), last,
   then the folders no manifest names any more moved out.

A failed round leaves the local repository as it was. Uploads to the store must keep the export's
order: model folders first, ``manifest.json`` last (so that it is the newest object).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from craft_export.options import ExportError
from craft_export.staging import KEY_FILE, RepoTransaction

from .manifest import MANIFEST, ManifestError, RepoView, parse_manifest
from .stores import Entry, Store, StoreError, safe_key

log = logging.getLogger(__name__)

__all__ = ["SYNC_FILE", "SyncError", "SyncReport", "needed_folders", "sync_once", "sync_forever"]

#: In every folder a sync copied: the tags of the store's objects it was copied from.
SYNC_FILE = "craft-sync"


def _copied(relative: str) -> bool:
    """Objects that belong to the repository: not ``craft-sync`` records, not the bytecode a Python
    backend writes beside ``model.py`` when it loads it (a served repository's, uploaded or mounted)."""
    return relative != SYNC_FILE and "__pycache__" not in relative.split("/")


class SyncError(RuntimeError):
    """A round that could not complete; the local repository is unchanged."""


@dataclass
class SyncReport:
    manifest_id: str | None = None  # the id now in the local repository
    changed: bool = False
    copied: list[str] = field(default_factory=list)  # folders downloaded
    reused: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def needed_folders(view: RepoView) -> list[str]:
    """Every top-level folder of the repository a manifest needs: its models and its assets' folders."""
    folders = set(view.folders)
    for path in view.assets.values():
        folders.add(path.relative_to(view.root.resolve()).parts[0])
    return sorted(folders)


def _tags(listing: Mapping[str, Entry]) -> str:
    """One line per object (the folder's own ``craft-sync`` left out): what the local copy records."""
    return "".join(f"{k}\t{v.tag}\n" for k, v in sorted(listing.items()) if _copied(k))


def _newer(name: str, listing: Mapping[str, Entry], manifest_time: float) -> list[str]:
    """Objects written after the manifest: an upload of a later export is under way (it writes the
    manifest last, so a complete repository has none)."""
    return [f"{name}/{k}" for k, v in sorted(listing.items()) if _copied(k) and v.modified > manifest_time]


def _local_tags(folder: Path) -> str | None:
    try:
        return (folder / SYNC_FILE).read_text()
    except OSError:
        return None


def _model_keys(data: bytes) -> dict[str, str]:
    """The content key the manifest records for each exported network (pipeline models have none)."""
    models = json.loads(data).get("models", {})
    return {name: rec["key"] for name, rec in models.items() if isinstance(rec, dict) and rec.get("key")}


def _download(store: Store, name: str, listing: Mapping[str, Entry], dest: Path,
              progress: Callable[[str], None]) -> None:
    for relative in sorted(listing):
        if not _copied(relative):
            continue
        target = dest.joinpath(*PurePosixPath(safe_key(relative)).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download(f"{name}/{relative}", target)
        progress(f"{name}/{relative}")
    (dest / SYNC_FILE).write_text(_tags(listing))


def _check_key(name: str, folder: Path, keys: Mapping[str, str]) -> None:
    want = keys.get(name)
    if want is None:
        return
    try:
        got = (folder / KEY_FILE).read_text().strip()
    except OSError:
        got = None
    if got != want:
        raise SyncError(f"{name}: the store's folder was built for key {got!r}, the manifest names {want!r} "
                        f"(an upload in progress, or model folders from another export)")


def _local_folders(repo: Path) -> set[str]:
    """The folders the local manifest needs (none when there is no readable one)."""
    try:
        return set(needed_folders(parse_manifest(repo, (repo / MANIFEST).read_bytes())))
    except (OSError, ManifestError):
        return set()


def sync_once(store: Store, repo: Path, progress: Callable[[str], None] = lambda key: None) -> SyncReport:
    """One round (module docstring). Raises :class:`SyncError` / :class:`StoreError`; the local
    repository is then as it was. ``progress(key)`` after each object copied."""
    t0 = time.perf_counter()
    repo = Path(repo).resolve()
    report = SyncReport()
    remote = store.read(MANIFEST)
    if remote is None:
        raise SyncError(f"{store}: no {MANIFEST} (not a craft model repository, or not uploaded yet)")
    try:
        view = parse_manifest(repo, remote, path=f"{store}/{MANIFEST}")
    except ManifestError as exc:
        raise SyncError(f"refusing the store's manifest, keeping the local copy: {exc}") from exc
    report.manifest_id = view.manifest_id
    local = repo / MANIFEST
    if local.is_file() and local.read_bytes() == remote:
        report.seconds = time.perf_counter() - t0
        return report
    try:
        _copy(store, repo, view, remote, report, progress)
    except ExportError as exc:  # the lock: another sync or an export is writing the repository
        raise SyncError(str(exc)) from exc
    report.changed = True
    report.seconds = time.perf_counter() - t0
    return report


def _copy(store: Store, repo: Path, view: RepoView, remote: bytes, report: SyncReport,
          progress: Callable[[str], None]) -> None:
    """Steps 3-6 of a round, in a transaction on ``repo``."""
    keys = _model_keys(remote)
    folders = needed_folders(view)
    manifest_time = store.modified(MANIFEST)
    if manifest_time is None:
        raise SyncError(f"{store}/{MANIFEST} disappeared during the round")
    with RepoTransaction(repo) as txn:
        listings = {}
        for name in folders:
            listing = store.listing(name)
            if not any(_copied(k) for k in listing):
                raise SyncError(f"{store}: {name}/ is named by {MANIFEST} but holds no objects "
                                f"(a half-uploaded repository?)")
            newer = _newer(name, listing, manifest_time)
            if newer:
                raise SyncError(f"{store}: {newer[:3]} were written after {MANIFEST} (an upload in progress?); "
                                f"the round waits for the upload's new {MANIFEST}")
            if (repo / name).is_dir() and _local_tags(repo / name) == _tags(listing):
                report.reused.append(name)
                continue
            listings[name] = listing
            _download(store, name, listing, txn.stage(name), progress)
            _check_key(name, txn.stage(name), keys)
            report.copied.append(name)
        # an upload that started meanwhile: the next round copies its result
        if store.read(MANIFEST) != remote:
            raise SyncError(f"{store}/{MANIFEST} changed during the round; the next round copies the new one")
        moved = [n for n, listing in listings.items() if _tags(store.listing(n)) != _tags(listing)]
        if moved:
            raise SyncError(f"{store}: objects of {moved} changed during the round; the next round copies them")
        report.removed = sorted(_local_folders(repo) - set(folders))
        txn.commit(report.copied, remote, remove=report.removed)


def sync_forever(store: Store, repo: Path, interval: float, stop: threading.Event | None = None,
                 on_round: Callable[[SyncReport | None, Exception | None], None] = lambda r, e: None,
                 progress: Callable[[str], None] = lambda key: None) -> None:
    """A round every ``interval`` seconds until ``stop`` is set; a failed round is reported and retried."""
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            report = sync_once(store, repo, progress)
        except (SyncError, StoreError, OSError) as exc:
            on_round(None, exc)
        else:
            on_round(report, None)
        stop.wait(interval)

