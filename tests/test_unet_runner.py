"""One Triton model for every UNet weight set (issue 14): a runtime-LoRA repository served end to end.

The tiny SD 1.5 demo recipe exported with ``--lora-mode runtime --pairs dog+watercolor`` (one hot
pair baked, everything else on the runtime network) behind a real ``craft serve`` (tritonserver of
the nvidia-pytriton wheel, loopback). Checked: the repository's one ``unet`` model replaces the
per-variant models; a served image equals the baked reference image (PyTorch, Eq. 8 weights) within
1/255 on the baked route, the runtime route and a continuous gamma; two concurrent requests with
different LoRAs each equal their solo image; a LoRA registered with ``craft export --lora-mode
runtime`` while the server runs is served on the next request, without a Triton reload; a variant
asked for again is merged in the stub and still gives the reference image; in process,
the served pipeline's code gives the same image with ACFG as one batch-2 call or two batch-1 calls.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from craft_export.exporter import ExportOptions, export_repository
from craft_ops.request import GenerateRequest

from craft_serving.triton_server import interrupt
from test_serving import _serve

# extended: about 2 minutes (an export and a server start); the default suite checks the same images
# in-process (tests/test_runtime_export.py), and .ci/run runs this module with `make test-extended`
pytestmark = [pytest.mark.server, pytest.mark.extended]

STEPS = 4
MAX_RANK = 8


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= 1


@pytest.fixture(scope="module")
def runtime_served(demo_dir, tmp_path_factory, one_torch_thread):
    from craft_client import CraftClient

    root = tmp_path_factory.mktemp("unet_runner")
    repo = root / "repo"
    export_repository(ExportOptions(recipe=demo_dir / "recipe-sd15.toml", out=repo, lora_mode="runtime",
                                    max_rank=MAX_RANK, pairs="dog+watercolor", runner="python"))
    log = root / "serve.log"
    proc, http, grpc = _serve(repo, log)
    try:
        yield repo, CraftClient(f"127.0.0.1:{grpc}", "grpc"), log
    finally:
        interrupt(proc)


def _want(ref, **kw) -> np.ndarray:
    prompts = kw.pop("prompt")
    return ref.generate(GenerateRequest(prompts=(prompts,), seed=kw.pop("seed", 5), steps=STEPS, **kw))


CASES = {  # (request, route): baked hot pair, runtime pair, continuous gamma on the hot pair -> runtime
    "baked_pair": dict(prompt="a dog <c> in watercolor style <s>", content="dog", style="watercolor"),
    "runtime_pair": dict(prompt="a bull <c> in fire style <s>", content="bull", style="fire"),
    "continuous_gamma": dict(prompt="a dog <c> in watercolor style <s>", content="dog", style="watercolor",
                             gamma_c=0.37, gamma_s=0.8),
}


def test_one_unet_model_and_runtime_images_equal_baked_reference(runtime_served, ref_pipes):
    repo, client, _ = runtime_served
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["networks"]["unet"] == "unet" and manifest["lora_mode"] == "runtime"
    assert (repo / "unet" / "config.pbtxt").is_file()
    # the baked variants hold weights only: no Triton model (no config) of their own
    folders = {v["model"] for v in manifest["variants"]}
    assert "unet_base" in folders and len(folders) == 4  # W_init, dog, watercolor, dog+watercolor
    assert not any((repo / f / "config.pbtxt").exists() for f in folders)
    assert all((repo / f / "1" / "changed.json").is_file() for f in folders - {"unet_base"})
    for name, kw in CASES.items():
        got = client.generate(**{**kw, "seed": 5, "steps": STEPS}).images
        want = _want(ref_pipes["sd15"], **dict(kw))
        assert _close(got, want), f"{name}: max diff {np.abs(got.astype(int) - want.astype(int)).max()}"


def test_concurrent_requests_with_different_loras_equal_solo(runtime_served):
    _, client, _ = runtime_served
    kws = [dict(CASES["runtime_pair"], seed=11),
           dict(prompt="a dog <c> in fire style <s>", content="dog", style="fire", gamma_s=0.6, seed=12)]
    solo = [client.generate(**kw, steps=STEPS).images for kw in kws]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda kw: client.generate(**kw, steps=STEPS).images, kws * 2))
    for i, got in enumerate(together):
        assert _close(got, solo[i % 2]), f"request {i} differs from its solo run"


def test_repeated_variant_is_merged_by_the_served_runner(runtime_served, ref_pipes):
    """A runtime-network variant asked for again is merged into W_init's graph by the ``unet`` stub
    (on its worker thread; the Triton log says when it serves) and the image stays the reference's."""
    _, client, log = runtime_served
    kw = dict(prompt="a bull <c> in watercolor style <s>", content="bull", style="watercolor", gamma_c=0.55)
    want = _want(ref_pipes["sd15"], seed=21, **dict(kw))
    deadline = time.monotonic() + 60
    while "craft: merged variant c=bull@0.55+s=watercolor@1 serving" not in log.read_text():
        assert time.monotonic() < deadline, "no merged variant served within 60 s"
        got = client.generate(**kw, seed=21, steps=STEPS).images
        assert _close(got, want)
        time.sleep(0.5)
    got = client.generate(**kw, seed=21, steps=STEPS).images  # on the merged session now
    assert _close(got, want), f"max diff {np.abs(got.astype(int) - want.astype(int)).max()}"


def test_lora_registered_while_serving_is_served_next_request(runtime_served, demo_dir, ref_pipes, tmp_path):
    """``craft export --lora-mode runtime`` with one more LoRA (factor file + manifest, no network rebuilt):
    the next request naming it is served, by the same stub process (no reload)."""
    from safetensors.torch import save_file

    from craft_export.recipe import load_recipe
    from craft_export.recipe_models import load_recipe_models
    from craft_reference.demo import lora_target_modules, make_lora_state_dict, recipe_text
    from craft_reference.pipeline import ReferencePipeline

    repo, client, log = runtime_served
    shapes = load_recipe_models(demo_dir / "recipe-sd15.toml").shapes
    sd = make_lora_state_dict(shapes, lora_target_modules(shapes), rank=6, alpha=6, seed=6, fmt="peft")
    save_file(sd, str(tmp_path / "sketch.safetensors"))
    head, tail = recipe_text("sd15", root=demo_dir).split("[defaults]")
    entry = f'[[lora]]\nname = "sketch"\nkind = "style"\npath = "{tmp_path}/sketch.safetensors"\n\n'
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(head + entry + "[defaults]" + tail)
    stubs = _unet_stub_pids()
    request = dict(prompt="a dog <c> in sketch style <s>", content="dog", style="sketch", seed=3, steps=STEPS)
    t0 = time.perf_counter()
    report = export_repository(ExportOptions(recipe=recipe, out=repo, lora_mode="runtime", max_rank=MAX_RANK,
                                             pairs="dog+watercolor", runner="python"))
    exported = time.perf_counter() - t0
    got = client.generate(**request).images
    served = time.perf_counter() - t0
    assert report.built == [] and report.loras["written"] == ["sketch"]
    ref = ReferencePipeline.from_recipe(load_recipe(recipe))
    want = ref.generate(GenerateRequest(prompts=(request["prompt"],), content="dog", style="sketch", seed=3,
                                        steps=STEPS))
    assert _close(got, want)
    assert _unet_stub_pids() == stubs  # served by the same process: no Triton reload
    print(f"new LoRA: exported in {exported:.2f} s, served ({STEPS} steps) {served:.2f} s after the export began")


def _unet_stub_pids() -> set[int]:
    """Stub processes of the ``unet`` model (their command line ends in the instance, unet_0_0)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"triton_python_backend_stub" in c for c in cmd) and b"unet_0_0" in cmd:
            pids.add(int(proc.name))
    return pids



def test_acfg_one_call_equals_two_calls(runtime_served):
    """The served pipeline's code in process (``LocalInfer``: the ``unet`` model's own runner): ACFG as
    one batch-2 request per step and as two batch-1 requests per step (``unet_calls="branch"``: the
    unconditional row then runs on W_init's session) give the same image within 1/255."""
    from craft_serving.local_infer import LocalInfer
    from craft_serving.runtime import PipelineRuntime

    repo, _, _ = runtime_served
    # merged and fed sessions off: the runtime network's own one or two calls
    local = LocalInfer(repo, threads=1, merged_variants=0, fed_variants=0)
    kw = CASES["runtime_pair"]
    request = GenerateRequest(prompts=(kw["prompt"],), content=kw["content"], style=kw["style"], seed=7, steps=STEPS)
    images, rows = {}, {}
    for calls in ("step", "branch"):
        start = len(local.unet_rows)
        images[calls] = PipelineRuntime(local.view, local, unet_calls=calls).generate(request)[0]
        rows[calls] = local.unet_rows[start:]
    assert rows == {"step": [2] * STEPS, "branch": [1] * (2 * STEPS)}
    assert _close(images["step"], images["branch"]), \
        f"max diff {np.abs(images['step'].astype(int) - images['branch'].astype(int)).max()}"
    with pytest.raises(ValueError, match="unet_calls"):
        PipelineRuntime(local.view, local, unet_calls="pairs")
