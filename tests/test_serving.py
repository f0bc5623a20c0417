"""End to end: craft export -> craft serve (real tritonserver on loopback) -> client, vs the reference."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from craft_client import CraftClient, CraftServerError
from craft_export.exporter import ExportOptions, export_repository
from craft_ops.request import GenerateRequest
from craft_serving.triton_server import TritonServerError, find_tritonserver, free_port

pytestmark = pytest.mark.server

try:
    find_tritonserver()
except TritonServerError as _exc:  # pragma: no cover - the dev extra installs it
    pytest.skip(f"no tritonserver: {_exc}", allow_module_level=True)

CRAFT = str(Path(sys.executable).with_name("craft"))
STEPS = 4


class Served:
    def __init__(self, repo: Path, recipe: Path, proc: subprocess.Popen, http: int, grpc: int):
        self.repo, self.recipe, self.proc = repo, recipe, proc
        self.http, self.grpc = f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"

    def client(self, protocol: str = "grpc") -> CraftClient:
        return CraftClient(self.grpc if protocol == "grpc" else self.http, protocol)


def _recipe(demo_dir: Path, arch: str, loras: list[str]) -> str:
    from craft_reference.demo import recipe_text

    return recipe_text(arch, loras, root=demo_dir)


def _serve(repo: Path, log: Path) -> tuple[subprocess.Popen, int, int]:
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen([CRAFT, "serve", "--repo", str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics), "--log-file", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = CraftClient(f"127.0.0.1:{http}", "http")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"craft serve exited: {proc.stdout.read()}\n{log.read_text() if log.exists() else ''}")
        if client.ready():
            return proc, http, grpc
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not ready: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(demo_dir, tmp_path_factory):
    """Tiny SD 1.5 and SDXL repositories, each behind its own `craft serve`."""
    root = tmp_path_factory.mktemp("served")
    servers = {}
    try:
        for arch in ("sd15", "sdxl"):
            recipe = root / f"recipe-{arch}.toml"
            recipe.write_text(_recipe(demo_dir, arch, ["dog", "bull", "watercolor"]))  # "fire" comes later
            repo = root / f"repo-{arch}"
            export_repository(ExportOptions(recipe=recipe, out=repo, runner="python"))
            proc, http, grpc = _serve(repo, root / f"{arch}.log")
            servers[arch] = Served(repo, recipe, proc, http, grpc)
        yield servers
    finally:
        for s in servers.values():
            s.proc.send_signal(signal.SIGINT)
            try:
                s.proc.wait(30)
            except subprocess.TimeoutExpired:
                s.proc.kill()


def _fields(**kw):
    kw.setdefault("seed", 5)
    kw.setdefault("steps", STEPS)
    return kw


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


CASES = {
    "acfg_both": dict(prompt="a dog <c> in watercolor style <s>", content="dog", style="watercolor"),
    "cfg_both": dict(prompt="a dog <c> in watercolor style <s>", content="dog", style="watercolor", mode="cfg"),
    "content_only": dict(prompt="a bull <c> on a beach", content="bull"),
    "style_only": dict(prompt="a house in watercolor style <s>", style="watercolor"),
    "neither": dict(prompt="a house"),
}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("case", list(CASES))
def test_served_image_matches_reference(served, ref_pipes, arch, case):
    kw = dict(CASES[case])
    prompt = kw.pop("prompt")
    with served[arch].client() as client:
        got = client.generate(prompt, **_fields(**kw)).images
    ref = ref_pipes[arch].generate(GenerateRequest(prompts=(prompt,), **_fields(**kw)))
    assert _close(got, ref), f"max diff {np.abs(got.astype(int) - ref.astype(int)).max()}"


def test_cli_generate_matches_local(served, tmp_path):
    s = served["sd15"]
    args = ["--prompt", "a dog <c> in watercolor style <s>", "--content", "dog", "--style", "watercolor",
            "--seed", "9", "--steps", str(STEPS)]
    remote = subprocess.run([CRAFT, "generate", "--url", s.grpc, *args, "--out", str(tmp_path / "r.png")],
                            capture_output=True, text=True, timeout=300)
    local = subprocess.run([CRAFT, "generate", "--local", "--recipe", str(s.recipe), *args, "--out", str(tmp_path / "l.png")],
                           capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    assert f"step {STEPS}/{STEPS}" in local.stderr  # the local run's progress bar
    from PIL import Image

    assert _close(np.asarray(Image.open(tmp_path / "r.png")), np.asarray(Image.open(tmp_path / "l.png")))


def test_grpc_and_http_agree_and_seed_is_deterministic(served):
    s = served["sd15"]
    kw = _fields(content="dog", style="watercolor")
    with s.client("grpc") as g, s.client("http") as h:
        a = g.generate("a dog <c> in watercolor style <s>", **kw).images
        b = h.generate("a dog <c> in watercolor style <s>", **kw).images
        c = g.generate("a dog <c> in watercolor style <s>", **kw).images
        d = g.generate("a dog <c> in watercolor style <s>", **{**kw, "seed": 6}).images
    assert np.array_equal(a, b) and np.array_equal(a, c) and not np.array_equal(a, d)


def test_several_prompts_in_one_request(served, ref_pipes):
    prompts = ["a dog <c> in watercolor style <s>", "a cat in watercolor style <s>"]
    with served["sd15"].client() as client:
        got = client.generate(prompts, **_fields(content="dog", style="watercolor"))
    assert got.images.shape == (2, 64, 64, 3)
    assert any("gamma_c = 0" in n for n in got.notes)
    ref = ref_pipes["sd15"].generate(GenerateRequest(prompts=tuple(prompts), **_fields(content="dog", style="watercolor")))
    assert _close(got.images, ref)


def test_streaming_progress_and_final_image(served):
    with served["sd15"].client() as client:
        events = list(client.stream("a dog <c>", **_fields(content="dog", steps=6, preview_every=3)))
        single = client.generate("a dog <c>", **_fields(content="dog", steps=6)).images
    progress = [e for e in events if e.result is None]
    assert [e.step for e in progress] == list(range(1, 7)) and all(e.total == 6 for e in progress)
    assert [e.step for e in progress if e.preview is not None] == [3, 6]
    assert events[-1].result is not None and np.array_equal(events[-1].result.images, single)


def test_async_client_offers_the_sync_methods(served):
    import asyncio

    from craft_client import AsyncCraftClient

    s = served["sd15"]
    kw = _fields(content="dog", steps=3)
    with s.client() as client:
        want, catalog = client.generate("a dog <c>", **kw).images, client.catalog()

    async def run(url: str, protocol: str):
        async with AsyncCraftClient(url, protocol, timeout=300) as client:
            assert await client.ready()
            images = (await client.generate("a dog <c>", **kw)).images
            events = [e async for e in client.stream("a dog <c>", **kw)] if protocol == "grpc" else []
            return images, await client.catalog(), events

    images, cat, events = asyncio.run(run(s.grpc, "grpc"))
    assert np.array_equal(images, want) and cat == catalog
    assert [e.step for e in events if e.result is None] == [1, 2, 3]
    assert events[-1].result is not None and np.array_equal(events[-1].result.images, want)
    images, cat, _ = asyncio.run(run(s.http, "http"))
    assert np.array_equal(images, want) and cat == catalog
    public = {n for n in dir(CraftClient) if not n.startswith("_")}
    assert public <= {n for n in dir(AsyncCraftClient) if not n.startswith("_")}


def test_stream_cancellation_stops_work(served):
    cancel = threading.Event()
    seen = []
    with served["sd15"].client() as client:
        for event in client.stream("a dog <c>", cancel=cancel, **_fields(content="dog", steps=400)):
            seen.append(event.step)
            if len(seen) == 3:
                cancel.set()
        assert len(seen) == 3 and max(seen) < 400
        # the server is free again: a short request completes promptly
        t0 = time.monotonic()
        client.generate("a dog <c>", **_fields(content="dog"))
        assert time.monotonic() - t0 < 60


def test_concurrent_mixed_requests_match_single(served):
    s = served["sd15"]
    combos = [("dog", "watercolor"), ("bull", "watercolor"), ("dog", None), (None, "watercolor")]
    jobs = [(combos[i % 4], 100 + i) for i in range(16)]

    def run(job):
        (c, st), seed = job
        prompt = " ".join(p for p in ("a thing", "<c>" if c else "", "<s>" if st else "") if p)
        with s.client() as client:
            return prompt, c, st, seed, client.generate(prompt, **_fields(content=c, style=st, seed=seed)).images

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    with s.client() as client:
        for prompt, c, st, seed, images in results[:16:3]:
            single = client.generate(prompt, **_fields(content=c, style=st, seed=seed)).images
            assert _close(images, single)
    assert len(results) == 16


BAD = [
    (dict(content="nobody"), "content"),
    (dict(prompt="a <c> dog"), "prompt"),
    (dict(height=60), "height"),
    (dict(width=4096), "width"),
    (dict(steps=0), "steps"),
    (dict(steps=1001), "steps"),
    (dict(guidance=float("nan")), "guidance"),
    (dict(content_window=[0.9, 0.1], content="dog"), "content_window"),
    (dict(gamma_c=0.5, content="dog"), "gamma_c"),
    (dict(mode="fast"), "mode"),
    (dict(scheduler="plms"), "scheduler"),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_inputs_are_invalid_arg_and_server_keeps_serving(served, protocol):
    s = served["sd15"]
    with s.client(protocol) as client:
        for kw, field in BAD:
            kw = dict(kw)
            prompt = kw.pop("prompt", "a dog")
            with pytest.raises(CraftServerError) as info:
                client.generate(prompt, **_fields(**kw))
            assert str(info.value).startswith(field) or f"{field}:" in str(info.value), str(info.value)
            assert "INVALID" in str(info.value.status) or info.value.status == "400", info.value.status
        assert client.ready()
        assert client.generate("a dog <c>", **_fields(content="dog")).images.shape == (1, 64, 64, 3)


def test_wrong_dtype_is_rejected(served):
    import tritonclient.grpc as grpcclient

    s = served["sd15"]
    c = grpcclient.InferenceServerClient(s.grpc)
    prompt = grpcclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a dog"], dtype=np.object_))
    steps = grpcclient.InferInput("steps", [1], "FP32")
    steps.set_data_from_numpy(np.array([4.0], dtype=np.float32))
    with pytest.raises(Exception, match="steps"):
        c.infer("craft_pipeline", [prompt, steps])
    assert c.is_server_ready()


def test_new_lora_servable_without_restart(served, demo_dir):
    s = served["sd15"]
    with s.client() as client:
        with pytest.raises(CraftServerError, match="style"):
            client.generate("a dog <c> in fire style <s>", **_fields(content="dog", style="fire"))
        before = client.catalog()
    assert "fire" not in [l["name"] for l in before["loras"]]
    s.recipe.write_text(_recipe(demo_dir, "sd15", ["dog", "bull", "watercolor", "fire"]))
    r = subprocess.run([CRAFT, "export", "--recipe", str(s.recipe), "--out", str(s.repo), "--runner", "python", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    with s.client() as client:
        got = client.generate("a dog <c> in fire style <s>", **_fields(content="dog", style="fire")).images
        assert "fire" in [l["name"] for l in client.catalog()["loras"]]
    ref = _local(s.recipe, "a dog <c> in fire style <s>", content="dog", style="fire")
    assert _close(got, ref)


def _local(recipe, prompt, **kw):
    from craft_export.recipe import load_recipe
    from craft_reference.pipeline import ReferencePipeline

    return ReferencePipeline.from_recipe(load_recipe(recipe)).generate(GenerateRequest(prompts=(prompt,), **_fields(**kw)))


def test_models_cli(served):
    r = subprocess.run([CRAFT, "models", "--url", served["sdxl"].grpc], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dog" in r.stdout and "watercolor" in r.stdout and "sdxl" in r.stdout


def test_generate_cli_reports_server_errors_cleanly(served, tmp_path):
    r = subprocess.run([CRAFT, "generate", "--url", served["sd15"].grpc, "--prompt", "x", "--content", "nobody",
                        "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "content" in r.stderr and "Traceback" not in r.stderr


# -- the trained toy world (the demo) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def served_toy(tmp_path_factory):
    """The toy-world demo recipe (craft demo-assets): exported, behind its own `craft serve`."""
    from craft_toyworld.catalog import committed_craft_loras, write_toy_demo_assets

    root = tmp_path_factory.mktemp("served-toy")
    recipe = write_toy_demo_assets(root / "assets")
    repo = root / "repo-toy"
    pairs = "star+checker" if {"star", "checker"} <= set(committed_craft_loras()) else "all"  # the demo's pair only
    export_repository(ExportOptions(recipe=recipe, out=repo, runner="python", pairs=pairs))
    proc, http, grpc = _serve(repo, root / "toy.log")
    try:
        yield Served(repo, recipe, proc, http, grpc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_toy_world_served_matches_local(served_toy):
    """Served = the reference that `craft generate --local` runs, on the trained toy world, within 1/255."""
    from craft_reference.pipeline import ReferencePipeline
    from craft_toyworld.catalog import committed_craft_loras

    if {"star", "checker"} <= set(committed_craft_loras()):  # the demo request
        kw = dict(prompt="a sks object <c> in zzs style <s>", content="star", style="checker")
    else:  # a checkout without the LoRAs: the base alone
        kw = dict(prompt="a red circle with stripes")
    prompt = kw.pop("prompt")
    with served_toy.client() as client:
        got = client.generate(prompt, **_fields(seed=7, **kw)).images
    ref = ReferencePipeline.from_recipe(served_toy.recipe).generate(
        GenerateRequest(prompts=(prompt,), **_fields(seed=7, **kw)))
    assert got.shape == (1, 64, 64, 3)
    assert _close(got, ref), f"max diff {np.abs(got.astype(int) - ref.astype(int)).max()}"
