"""Three `craft serve` replicas on one repository: a re-export reaches all of them, and a client
with all three endpoints loses no request when one replica is killed under load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

from craft_client import CraftClient, RetryPolicy
from craft_export.exporter import ExportOptions, export_repository
from craft_serving.triton_server import TritonServerError, find_tritonserver, reserve_ports

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.extended]

try:
    find_tritonserver()
except TritonServerError as _exc:  # pragma: no cover - the dev extra installs it
    pytest.skip(f"no tritonserver: {_exc}", allow_module_level=True)

CRAFT = str(Path(sys.executable).with_name("craft"))
REPLICAS = 3
ADMIN_KEY = "scaleout-admin-key-0123456789"
REQUEST = dict(prompt="a dog <c> in watercolor style <s>", content="dog", style="watercolor", seed=3, steps=2)


class Replica:
    def __init__(self, repo: Path, log: Path):
        self.http, self.grpc, metrics = reserve_ports(3)
        # its own session: killing the group takes tritonserver and its stubs with it
        self.proc = subprocess.Popen(
            [CRAFT, "serve", "--repo", str(repo), "--http-port", str(self.http), "--grpc-port", str(self.grpc),
             "--metrics-port", str(metrics), "--log-file", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "CRAFT_ADMIN_KEY": ADMIN_KEY})
        self.url = f"127.0.0.1:{self.grpc}"
        self.log = log

    def wait_ready(self, deadline: float) -> None:
        with CraftClient(self.url, timeout=10) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"craft serve exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
                if client.ready():
                    return
                time.sleep(0.5)
        raise RuntimeError(f"replica not ready: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGINT) -> None:
        """SIGINT: craft serve stops its tritonserver. SIGKILL: the whole process tree dies at once
        (tritonserver runs in a session of its own, so a process-group kill would miss it)."""
        if self.proc.poll() is not None:
            return
        if sig == signal.SIGKILL:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(tree, timeout=30)
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.stop(signal.SIGKILL)


def _recipe(demo_dir: Path, loras: list[str]) -> str:
    from craft_reference.demo import recipe_text

    return recipe_text("sd15", loras, root=demo_dir)


@pytest.fixture(scope="module")
def replicas(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    recipe, repo = root / "recipe.toml", root / "repo"
    recipe.write_text(_recipe(demo_dir, ["dog", "watercolor"]))
    export_repository(ExportOptions(recipe=recipe, out=repo, runner="python"))
    started = [Replica(repo, root / f"replica-{i}.log") for i in range(REPLICAS)]
    try:
        deadline = time.monotonic() + 900  # three servers loading at once on a busy 2-core machine
        for r in started:
            r.wait_ready(deadline)
        yield recipe, repo, started
    finally:
        for r in started:
            r.stop()


def _soak_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("craft_soak_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_soak_over_replicas(replicas):
    """benchmarks/soak.py, short: mixed traffic over the three replicas, every image as when run alone."""
    _, _, reps = replicas
    report = _soak_module().run([r.url for r in reps], clients=4, duration=20, server_pid=reps[0].proc.pid,
                                menu_size=8, http_urls=[f"127.0.0.1:{r.http}" for r in reps])
    assert report["failures"] == [] and report["mismatches"] == []
    assert report["requests"] >= 4 and report["ok"]
    assert any(name.startswith("tritonserver") for name in report["memory"])


def _fields(**kw) -> dict:
    return {k: v for k, v in {**REQUEST, **kw}.items() if k != "prompt"}


def _file_id(repo: Path) -> str:
    import hashlib

    return hashlib.sha256((repo / "manifest.json").read_bytes()).hexdigest()


def test_reexport_under_load_reaches_every_replica(replicas, demo_dir):
    """A re-export while 16 clients run (the issue's load): no request fails or sees a half-written model; afterwards
    every replica serves the new catalogue (and the new LoRA). Every response names the manifest
    that served it (the sha256 of manifest.json): the old one's before the swap, the new one's after;
    how long replicas disagree is measured and printed."""
    recipe, repo, reps = replicas
    urls = [r.url for r in reps]
    old_id = _file_id(repo)
    with CraftClient(urls[0], timeout=300) as client:  # minutes when it is a replica's first request on a busy machine
        first = client.generate(REQUEST["prompt"], **_fields())
    expected = first.images
    assert first.manifest == old_id
    stop, errors, answers, served_by = threading.Event(), [], [], []

    def worker() -> None:
        with CraftClient(urls, timeout=300) as client:
            while not stop.is_set():
                try:
                    result = client.generate(REQUEST["prompt"], **_fields())
                    answers.append(np.array_equal(result.images, expected))
                    served_by.append((time.monotonic(), result.manifest))
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    errors.append(repr(exc))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    recipe.write_text(_recipe(demo_dir, ["dog", "watercolor", "fire"]))
    r = subprocess.run([CRAFT, "export", "--recipe", str(recipe), "--out", str(repo), "--runner", "python"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    swapped = time.monotonic()  # the export swaps manifest.json just before it returns
    new_id = _file_id(repo)
    assert new_id != old_id
    def probe(url: str) -> tuple[float | None, float | None]:
        """Seconds after the swap until this replica's catalogue, then its pipeline responses, are on the
        new manifest; every answer on the way is the old or the new one, never an error."""
        catalog_at = pipeline_at = None
        with CraftClient(url, timeout=300) as client:  # the first request after the swap loads new models
            while (catalog_at is None or pipeline_at is None) and time.monotonic() - swapped < 120:
                catalog = client.catalog()
                names = {lora["name"] for lora in catalog["loras"]}
                assert names in ({"dog", "watercolor"}, {"dog", "watercolor", "fire"})
                assert catalog["manifest_id"] == (new_id if "fire" in names else old_id)
                if "fire" in names and catalog_at is None:
                    catalog_at = time.monotonic() - swapped
                if pipeline_at is None:
                    manifest = client.generate(REQUEST["prompt"], **_fields(steps=1)).manifest
                    assert manifest in (old_id, new_id)
                    if manifest == new_id:
                        pipeline_at = time.monotonic() - swapped
                time.sleep(0.1)
        return catalog_at, pipeline_at

    with ThreadPoolExecutor(REPLICAS) as pool:
        probed = dict(zip(urls, pool.map(probe, urls)))
    seen = {url: c for url, (c, _) in probed.items() if c is not None}
    pipeline = {url: p for url, (_, p) in probed.items() if p is not None}
    time.sleep(2.0)  # requests keep flowing across the swap on every replica
    stop.set()
    for t in threads:
        t.join(300)
    assert errors == [] and answers and all(answers), (errors[:3], answers.count(False))
    assert len(seen) == REPLICAS, f"replicas still on the old manifest after 120 s: {set(urls) - set(seen)}"
    assert len(pipeline) == REPLICAS, f"pipelines still on the old manifest after 120 s: {set(urls) - set(pipeline)}"
    ids = [m for _, m in served_by]
    assert set(ids) <= {old_id, new_id} and ids[-1] == new_id, set(ids)
    # the last old-manifest answer: a request that started before the swap finishing after it
    last_old = max((t - swapped for t, m in served_by if m == old_id), default=float("-inf"))
    with CraftClient(urls) as client:  # the new LoRA is servable through any of them
        images = [client.generate("a dog <c> in fire style <s>", **_fields(style="fire", seed=1)) for _ in urls]
    assert all(np.array_equal(images[0].images, im.images) for im in images[1:])
    assert {im.manifest for im in images} == {new_id}
    print(f"{len(answers)} requests across the re-export, 0 failed; every replica on the new catalogue "
          f"after {max(seen.values()):.2f} s (slowest), its pipeline answering with the new manifest id after "
          f"{max(pipeline.values()):.2f} s (per replica: {', '.join(f'{v:.2f}' for v in pipeline.values())} s); "
          f"last answer under the old manifest {last_old:.2f} s after the swap; "
          f"{ids.count(old_id)} answers under the old id, {ids.count(new_id)} under the new")


def _wait_for_traffic(url: str, timeout: float = 120.0) -> None:
    import tritonclient.grpc as grpcclient

    from craft_serving.admin import admin_headers

    client = grpcclient.InferenceServerClient(url)
    key = admin_headers(ADMIN_KEY, "grpc")  # statistics are an admin API
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.get_inference_statistics("craft_pipeline", headers=key, as_json=True)["model_stats"][0]
        if int(stats["inference_stats"]["success"].get("count", 0)) >= 1:
            return
        time.sleep(0.1)
    raise AssertionError(f"no request reached {url} in {timeout} s")


def test_killing_one_replica_under_load_fails_no_request(replicas):
    _, _, reps = replicas
    urls = [r.url for r in reps]
    with CraftClient(urls[0], timeout=120) as client:
        expected = client.generate(REQUEST["prompt"], **_fields()).images
    errors, per_client = [], 6

    def worker(i: int) -> list[np.ndarray]:
        out = []
        with CraftClient(urls, timeout=120, retry=RetryPolicy(retries=4, backoff_s=0.2)) as client:
            for _ in range(per_client):
                try:
                    out.append(client.generate(REQUEST["prompt"], **_fields()).images)
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    errors.append(repr(exc))
        return out

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(worker, i) for i in range(8)]
        _wait_for_traffic(reps[-1].url)  # the load reaches the replica that is about to die
        reps[-1].stop(signal.SIGKILL)
        results = [f.result(timeout=600) for f in futures]
    assert errors == []
    images = [im for out in results for im in out]
    assert len(images) == 8 * per_client
    assert all(np.array_equal(im, expected) for im in images)


def test_a_replica_on_a_synced_copy_follows_the_store(replicas, demo_dir, tmp_path):
    """deploy/cloud in small: the replicas' repository stands in for the bucket. `craft sync --once` (the
    init container) makes a local copy, a fourth craft serve serves it with the bucket's manifest id;
    after a re-export into the bucket one sync round (the sidecar's) moves it to the new manifest while
    clients keep going: no failed request, every answer under the old or the new id."""
    recipe, repo, _ = replicas
    copy = tmp_path / "copy"
    r = subprocess.run([CRAFT, "sync", "--source", str(repo), "--repo", str(copy), "--once"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    old_id = _file_id(repo)
    assert f"manifest {old_id} in place" in r.stdout and _file_id(copy) == old_id
    replica = Replica(copy, tmp_path / "synced.log")
    try:
        replica.wait_ready(time.monotonic() + 300)
        with CraftClient(replica.url, timeout=120) as client:
            assert client.generate(REQUEST["prompt"], **_fields()).manifest == old_id
        with CraftClient(replica.url) as client:
            names = sorted({lora["name"] for lora in client.catalog()["loras"]} | {"bull"})
        recipe.write_text(_recipe(demo_dir, names))
        r = subprocess.run([CRAFT, "export", "--recipe", str(recipe), "--out", str(repo), "--runner", "python"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        new_id = _file_id(repo)
        stop, errors, ids = threading.Event(), [], []

        def worker() -> None:
            with CraftClient(replica.url, timeout=300) as client:
                while not stop.is_set():
                    try:
                        ids.append(client.generate(REQUEST["prompt"], **_fields(steps=1)).manifest)
                    except Exception as exc:  # noqa: BLE001 - every failure is the finding
                        errors.append(repr(exc))

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        from craft_serving.repo_sync import sync_once
        from craft_serving.stores import FolderStore

        report = sync_once(FolderStore(repo), copy)
        assert report.changed and any("bull" in name for name in report.copied), report
        with CraftClient(replica.url, timeout=120) as client:
            got = client.generate("a bull <c> in watercolor style <s>", **_fields(content="bull"))
        stop.set()
        for t in threads:
            t.join(300)
        assert errors == [] and set(ids) <= {old_id, new_id} and ids, (errors[:3], set(ids))
        assert got.manifest == new_id == _file_id(copy)
    finally:
        replica.stop()
