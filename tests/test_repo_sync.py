"""``craft sync`` (deploy/cloud's init container and sidecar): a local copy of a repository kept up to date
from a store, never exposing a half-copied model. A local folder stands in for the bucket (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from craft_export.plan import FORMAT_VERSION
from craft_serving.manifest import MANIFEST, PIPELINE_MODELS, read_manifest
from craft_serving.repo_sync import SYNC_FILE, SyncError, sync_once
from craft_serving.stores import FolderStore, StoreError, open_store, safe_key

CRAFT = str(Path(sys.executable).with_name("craft"))


def _manifest(models: dict[str, str], loras: list[str]) -> dict:
    """A manifest that passes the serving side's checks; ``models``: network model -> content key."""
    unets = sorted(m for m in models if m.startswith("unet_"))
    variants = [{"content": None if u == "unet_base" else u.removeprefix("unet_c-"),
                 "gamma_c": 0.0 if u == "unet_base" else 1.0, "style": None, "gamma_s": 0.0, "model": u} for u in unets]
    return {
        "format_version": FORMAT_VERSION, "arch": "sd15",
        "loras": [{"name": n, "kind": "content", "gammas": [1.0]} for n in loras],
        "variants": variants, "networks": {"text_encoder": "text_encoder", "vae_decoder": "vae_decoder"},
        "assets": {"tokenizer": "craft_pipeline/assets/tokenizer", "scheduler_config": "craft_pipeline/assets/s.json"},
        "defaults": {"steps": 2, "guidance": 6.5, "scheduler": "euler", "height": 64, "width": 64, "mode": "acfg",
                     "content_window": [0.0, 0.7], "style_window": [0.28, 1.0]},
        "engine": {"min_size": 64, "max_size": 64, "max_batch": 2},
        "models": {name: {"key": key} for name, key in models.items()},
    }


def _put(path: Path, data: bytes) -> None:
    """Upload one object; an unchanged file is left alone, as an upload of only what changed does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)


def _export(bucket: Path, version: int, loras: list[str]) -> dict[str, str]:
    """Write a repository into ``bucket`` in the export's order (folders, each craft-key first, then the
    manifest); every file of a network model holds its content key, so a reader can tell which export a
    folder came from."""
    models = {"text_encoder": "te-1", "vae_decoder": "vae-1", "unet_base": "base-1",
              **{f"unet_c-{n}": f"{n}-{version}" for n in loras}}
    for name, key in models.items():
        _put(bucket / name / "craft-key", key.encode() + b"\n")
        _put(bucket / name / "config.pbtxt", f'name: "{name}"\n'.encode())
        _put(bucket / name / "1" / "model.onnx", key.encode() * 1000)
    for name in PIPELINE_MODELS:
        _put(bucket / name / "config.pbtxt", f'name: "{name}"\n'.encode())
        _put(bucket / name / "1" / "model.py", f"# export {version}\n".encode())
    _put(bucket / "craft_pipeline" / "assets" / "tokenizer" / "vocab.json", b"{}")
    _put(bucket / "craft_pipeline" / "assets" / "s.json", b"{}")
    _put(bucket / MANIFEST, json.dumps(_manifest(models, loras), indent=2, sort_keys=True).encode())
    return models


def _consistent(repo: Path) -> str | None:
    """None when every model the local manifest names is complete and from the export the manifest
    records; else what is wrong. No manifest yet is consistent (craft serve waits for the init sync)."""
    try:
        manifest = json.loads((repo / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None
    for name, record in manifest["models"].items():
        try:
            key = (repo / name / "craft-key").read_text().strip()
            weights = (repo / name / "1" / "model.onnx").read_bytes()
        except OSError as exc:
            return f"{name}: {exc}"
        if key != record["key"] or weights != key.encode() * 1000:
            return f"{name}: holds {key!r}, the manifest names {record['key']!r}"
    return None


def _complete(repo: Path) -> str | None:
    """None when every model the local manifest names is a complete folder written by one export.

    Weaker than :func:`_consistent` while a round commits: a folder rebuilt under the same name is
    renamed into place just before the manifest that names its new key, as ``craft export`` does."""
    try:
        manifest = json.loads((repo / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None
    for name in manifest["models"]:
        try:
            (repo / name / "config.pbtxt").read_bytes()
            weights = (repo / name / "1" / "model.onnx").read_bytes()
        except OSError as exc:
            return f"{name}: {exc}"
        unit = weights[:len(weights) // 1000]
        if not unit or weights != unit * 1000:
            return f"{name}: model.onnx is not one export's file ({len(weights)} bytes)"
    return None


def _same_tree(a: Path, b: Path) -> bool:
    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and p.name != SYNC_FILE}
    return files(a) == files(b)


class WatchedStore(FolderStore):
    """The bucket, checking the local copy's consistency at every download (mid-round) and able to
    run an action (an upload that overlaps the round) before the download of a given object."""

    def __init__(self, root: Path, repo: Path):
        super().__init__(root)
        object.__setattr__(self, "repo", repo)
        object.__setattr__(self, "seen", [])
        object.__setattr__(self, "at", {})

    def download(self, key: str, dest: Path) -> None:
        self.seen.append(_consistent(self.repo))
        action = self.at.pop(key, None)
        if action:
            action()
        super().download(key, dest)


@pytest.fixture
def bucket_and_repo(tmp_path):
    bucket, repo = tmp_path / "bucket", tmp_path / "repo"
    bucket.mkdir()
    return bucket, repo


def test_first_round_copies_the_repository_byte_for_byte(bucket_and_repo):
    bucket, repo = bucket_and_repo
    _export(bucket, 1, ["dog"])
    report = sync_once(open_store(str(bucket)), repo)
    assert report.changed and not report.reused and "unet_c-dog" in report.copied
    assert _same_tree(bucket, repo)
    view = read_manifest(repo)  # the serving side reads the copy, and its id is the bucket's file's
    assert view.manifest_id == report.manifest_id == hashlib.sha256((bucket / MANIFEST).read_bytes()).hexdigest()
    assert not (repo / ".craft-staging").exists()
    again = sync_once(open_store(str(bucket)), repo)
    assert not again.changed and not again.copied


def test_reexport_copies_what_changed_and_never_exposes_a_half_copied_model(bucket_and_repo):
    bucket, repo = bucket_and_repo
    _export(bucket, 1, ["dog", "cat"])
    sync_once(FolderStore(bucket), repo)
    old_id = read_manifest(repo).manifest_id
    # export 2: "dog" rebuilt in place (same folder name, new key), "cat" retired, "fox" added
    _export(bucket, 2, ["dog", "fox"])
    import shutil

    shutil.rmtree(bucket / "unet_c-cat")
    store = WatchedStore(bucket, repo)
    report = sync_once(store, repo)
    assert sorted(report.removed) == ["unet_c-cat"] and not (repo / "unet_c-cat").exists()
    assert {"unet_c-dog", "unet_c-fox"} <= set(report.copied)
    assert {"text_encoder", "vae_decoder", "unet_base"} <= set(report.reused)  # unchanged objects: not copied
    # while the round downloaded, the local copy was export 1, complete
    assert store.seen and all(s is None for s in store.seen), [s for s in store.seen if s]
    assert _same_tree(bucket, repo) and read_manifest(repo).manifest_id != old_id


def test_a_reader_racing_the_rounds_only_ever_sees_complete_repositories(bucket_and_repo):
    """A reader thread checks the local copy in a loop while ten re-exports are synced: while a manifest
    is in place, every model it names is there, complete. (A check during which the manifest was
    replaced is not counted: the folders the old one named are retired right after the swap.)"""
    bucket, repo = bucket_and_repo
    _export(bucket, 0, ["dog"])
    sync_once(FolderStore(bucket), repo)
    stop, problems, checks = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            before = (repo / MANIFEST).read_bytes()
            problem = _complete(repo)
            if (repo / MANIFEST).read_bytes() != before:
                continue
            checks[0] += 1
            if problem:
                problems.append(problem)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 11):
            _export(bucket, version, ["dog", f"l{version % 3}"])
            sync_once(FolderStore(bucket), repo)
    finally:
        stop.set()
        thread.join()
    assert problems == [] and checks[0] > 10
    assert _consistent(repo) is None
    assert json.loads((repo / MANIFEST).read_text())["models"]["unet_c-dog"]["key"] == "dog-10"


def test_an_upload_during_the_round_drops_it_and_the_next_round_copies_it(bucket_and_repo):
    bucket, repo = bucket_and_repo
    _export(bucket, 1, ["dog"])
    sync_once(FolderStore(bucket), repo)
    before = (repo / MANIFEST).read_bytes()
    _export(bucket, 2, ["dog"])
    store = WatchedStore(bucket, repo)
    store.at["craft_catalog/config.pbtxt"] = lambda: _export(bucket, 3, ["dog", "fox"])  # lands mid-round
    with pytest.raises(SyncError, match="changed during the round|an upload in progress"):
        sync_once(store, repo)
    assert (repo / MANIFEST).read_bytes() == before and _consistent(repo) is None
    assert not (repo / ".craft-staging").exists()
    sync_once(FolderStore(bucket), repo)
    assert _same_tree(bucket, repo)


def test_objects_replaced_under_an_unchanged_manifest_drop_the_round(bucket_and_repo):
    """An upload that rewrites a folder's files (before its manifest) while the round copies that folder:
    caught by the listing re-check, although the folder's craft-key still matches."""
    bucket, repo = bucket_and_repo
    _export(bucket, 1, ["dog"])
    store = WatchedStore(bucket, repo)
    target = bucket / "unet_base" / "1" / "model.onnx"
    store.at["unet_base/1/model.onnx"] = lambda: target.write_bytes(b"next export, half written")
    with pytest.raises(SyncError, match="unet_base"):
        sync_once(store, repo)
    assert not (repo / MANIFEST).exists()


def _newest(path: Path, after: Path) -> None:
    """Give ``path`` a modification time after ``after``'s (file times are coarser than the writes)."""
    later = after.stat().st_mtime + 2
    os.utime(path, (later, later))


@pytest.mark.parametrize("damage", ["missing_folder", "wrong_key", "bad_json", "escaping_asset", "no_manifest",
                                    "upload_under_way"])
def test_a_broken_bucket_leaves_the_local_copy_as_it_was(bucket_and_repo, damage):
    bucket, repo = bucket_and_repo
    _export(bucket, 1, ["dog"])
    sync_once(FolderStore(bucket), repo)
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    _export(bucket, 2, ["dog", "fox"])
    manifest = json.loads((bucket / MANIFEST).read_text())
    if damage == "missing_folder":  # a half-uploaded repository: the manifest went up first
        import shutil

        shutil.rmtree(bucket / "unet_c-fox")
        match = "unet_c-fox/ is named"
    elif damage == "wrong_key":  # a folder from another export
        (bucket / "unet_c-fox" / "craft-key").write_text("fox-1\n")
        _newest(bucket / MANIFEST, bucket / "unet_c-fox" / "craft-key")
        match = "unet_c-fox: the store's folder was built for key 'fox-1'"
    elif damage == "upload_under_way":  # export 3's first object, after export 2's manifest
        (bucket / "unet_base" / "1" / "model.onnx").write_bytes(b"base-3" * 1000)
        _newest(bucket / "unet_base" / "1" / "model.onnx", bucket / MANIFEST)
        match = r"\['unet_base/1/model.onnx'\] were written after manifest.json"
    elif damage == "bad_json":
        (bucket / MANIFEST).write_text("{not json")
        match = "not valid JSON"
    elif damage == "escaping_asset":
        manifest["assets"]["tokenizer"] = "../../etc"
        (bucket / MANIFEST).write_text(json.dumps(manifest))
        match = "escapes the repository"
    else:
        (bucket / MANIFEST).unlink()
        match = "no manifest.json"
    with pytest.raises(SyncError, match=match):
        sync_once(FolderStore(bucket), repo)
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before


def test_keys_that_leave_the_folder_are_refused():
    for key in ("../x", "/etc/passwd", "a/../../b", "a//b", "a\\b", ""):
        with pytest.raises(StoreError, match="not a plain relative path"):
            safe_key(key)
    assert safe_key("1/model.onnx") == "1/model.onnx"


def test_cli_sync_once(bucket_and_repo):
    bucket, repo = bucket_and_repo
    _export(bucket, 1, ["dog"])
    r = subprocess.run([CRAFT, "sync", "--source", str(bucket), "--repo", str(repo), "--once"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256((bucket / MANIFEST).read_bytes()).hexdigest()
    assert f"manifest {digest} in place" in r.stdout and _same_tree(bucket, repo)
    r = subprocess.run([CRAFT, "sync", "--source", str(bucket / "nowhere"), "--repo", str(repo), "--once"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--source" in r.stderr and "nowhere" in r.stderr


def test_s3_store_against_an_in_process_s3(bucket_and_repo, monkeypatch):
    """The boto3 adapter (keys under a prefix, paginated listings, missing objects, LastModified) against
    moto's in-process S3 (no network): a first sync and a re-export, as with a folder store."""
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    from craft_serving.stores import S3Store

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bucket, repo = bucket_and_repo

    def upload(client) -> None:  # model folders first, manifest.json last
        files = sorted(p for p in bucket.rglob("*") if p.is_file())
        for path in [p for p in files if p.name != MANIFEST] + [bucket / MANIFEST]:
            client.upload_file(str(path), "models", f"sd15/repo/{path.relative_to(bucket).as_posix()}")

    with moto.mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="models")
        store = S3Store("s3://models/sd15/repo")
        with pytest.raises(SyncError, match="no manifest.json"):
            sync_once(store, repo)
        _export(bucket, 1, ["dog"])
        upload(client)
        first = sync_once(store, repo)
        assert first.changed and _same_tree(bucket, repo)
        assert read_manifest(repo).manifest_id == hashlib.sha256((bucket / MANIFEST).read_bytes()).hexdigest()
        assert store.listing("unet_base").keys() == {"craft-key", "config.pbtxt", "1/model.onnx"}
        _export(bucket, 2, ["dog", "fox"])
        upload(client)
        second = sync_once(store, repo)
        assert {"unet_c-dog", "unet_c-fox"} <= set(second.copied) and "text_encoder" in second.reused
        assert _same_tree(bucket, repo)
        assert not sync_once(store, repo).changed
    with pytest.raises(StoreError, match="expected s3://BUCKET/PREFIX"):
        S3Store("s3:///nothing")


def test_python_bytecode_of_a_served_repository_is_not_copied(bucket_and_repo):
    """A repository that a server has loaded holds __pycache__ beside each model.py, written after the
    manifest: neither an upload in progress nor part of the copy."""
    bucket, repo = bucket_and_repo
    _export(bucket, 1, ["dog"])
    pyc = bucket / "craft_pipeline" / "1" / "__pycache__" / "model.cpython-311.pyc"
    _put(pyc, b"bytecode")
    _newest(pyc, bucket / MANIFEST)
    sync_once(FolderStore(bucket), repo)
    assert not list(repo.rglob("__pycache__"))
    pyc.unlink()
    assert _same_tree(bucket, repo)
