"""An export into a repository on a file system that fills up (a real one: a small tmpfs), not the
file-size limit that stands in for it in ``test_export.py``. Needs root (``mount``); skipped otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from craft_export.exporter import ExportOptions, export_repository
from craft_serving.manifest import read_manifest
from test_export import CRAFT, _tree_digest, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.extended]

MARGIN = 2 << 20  # free bytes left on the small file system: less than one new UNet model (about 4.6 MB)


def _used_bytes(folder: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def _export(recipe: Path, repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CRAFT, "export", "--recipe", str(recipe), "--out", str(repo), "--runner", "python"],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs mount point; the test sizes it (``mount -o remount,size=...``)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _resize(mnt: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={-(-size // 4096) * 4}k", str(mnt)], check=True)


def test_export_onto_a_full_file_system_leaves_the_repository_byte_identical(demo_dir, tmp_path, small_fs):
    roomy = tmp_path / "roomy"
    export_repository(ExportOptions(recipe=write_recipe(demo_dir, "sd15", ["dog", "watercolor"], tmp_path / "a.toml"),
                                    out=roomy, runner="python"))
    _resize(small_fs, _used_bytes(roomy) + MARGIN)
    repo = small_fs / "repo"
    shutil.copytree(roomy, repo)
    before = _tree_digest(repo)
    free = shutil.disk_usage(small_fs).free
    assert free < 4 << 20, f"{free} bytes free: room for a new model, the test would not fill the disk"

    grown = write_recipe(demo_dir, "sd15", ["dog", "watercolor", "fire"], tmp_path / "b.toml")
    r = _export(grown, repo)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "No space left on device" in r.stderr and "the repository is unchanged" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert _tree_digest(repo) == before  # every file, byte for byte; no staging left behind either
    assert shutil.disk_usage(small_fs).free >= free - (64 << 10), "the failed export left files behind"

    _resize(small_fs, 256 << 20)  # room again: the same export now succeeds
    r = _export(grown, repo)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fire" in read_manifest(repo).catalog and not (repo / ".craft-staging").exists()
