"""TensorRT sessions on the tiny models (GPU), and what of that must hold without a GPU (CPU).

GPU tests (``@pytest.mark.gpu``, skipped by conftest without CUDA, and here without tensorrt):
TrtSession vs ONNX Runtime on exported engines, CUDA-graph replay vs eager, refit vs a fresh build
of the same weights, concurrent vs serial runs, and whole images (``craft_ops.sampling.sample``
with TensorRT engines) vs the fp32 PyTorch reference by PSNR.

CPU tests: the module imports without tensorrt; the batching / ACFG grouping logic of
TrtDenoiser and run_batched on torch tensors (with stand-in sessions); ``benchmarks/gpu_bench.py`` exits 0
with ``{"skipped": "no CUDA GPU"}`` when no GPU is visible.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from craft_ops.aggregate import BASE, Variant
from craft_ops.request import GenerateRequest
from craft_ops.sampling import UNetCall

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "gpu_bench.py"


# ---------------------------------------------------------------------------------------------
# CPU: no tensorrt, no GPU
# ---------------------------------------------------------------------------------------------

def test_trt_runner_imports_without_tensorrt_and_bench_skips_without_gpu(tmp_path):
    # the module imports with tensorrt made unimportable; making a session says what is missing
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "import craft_export.trt_session as t\n"
        "try:\n"
        "    t.TrtSession(b'')\n"
        "except t.TrtRunnerError as exc:\n"
        "    print('error:', exc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "error:" in r.stdout and "tensorrt" in r.stdout

    # the benchmark with no visible GPU: exit 0, print and save the skipped record, only in --out
    results = ROOT / "benchmarks" / "results"
    before = sorted(p.name for p in results.iterdir()) if results.is_dir() else []
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(BENCH), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert '{"skipped": "no CUDA GPU"}' in r.stdout
    written = sorted((tmp_path / "out").iterdir())
    assert [p.suffix for p in written] == [".json", ".md"] and written[0].name.startswith("no-gpu-")
    assert json.loads(written[0].read_text())["skipped"] == "no CUDA GPU"
    after = sorted(p.name for p in results.iterdir()) if results.is_dir() else []
    assert after == before


@pytest.mark.extended  # ~35 s; .ci/run runs it (make test-extended)
def test_gpu_bench_dry_run_on_tiny_models_exercises_the_torch_paths(tmp_path):
    # --tiny: the benchmark's PyTorch paths (UNet step timing and FLOP count, whole ACFG / CFG images
    # through craft_ops.sampling, the diffusers PEFT baseline where peft is installed) on CPU tiny
    # models, SD 1.5 and SDXL
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(BENCH), "--tiny", "--quick", "--arch", "sd15,sdxl",
                        "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    for arch in ("sd15", "sdxl"):
        sections = record["arches"][arch]
        assert not [k for k, v in sections.items() if "error" in v], sections
        assert sections["unet"]["flop_per_sample"] > 0  # counted on the (tiny) model timed
        for batch in ("1", "2"):
            row = sections["unet"]["batches"][batch]["torch_fp16_eager"]
            assert row["finite"] and row["median_ms"] > 0 and row["tflops"] > 0
        assert "skipped" in sections["unet"]["engine"] and "skipped" in sections["e2e"]["trt"]
        runs = sections["e2e"]["runs"]
        assert runs["torch_acfg"]["per_step_ms"] > 0 and runs["torch_cfg"]["per_step_ms"] > 0
        diffusers = sections["diffusers"]
        if "runs" in diffusers:  # peft installed (the gpu extra)
            assert diffusers["runs"]["diffusers_lora_unfused"]["median_ms"] > 0
            assert diffusers["runs"]["diffusers_lora_fused"]["median_ms"] > 0
            assert diffusers["peft_wrapped_modules"] == diffusers["lora_modules"]
        else:
            assert "peft" in json.dumps(diffusers)


class _FakeSession:
    """Stands in for TrtSession in the grouping logic: eps = scale * sample + timestep (CPU)."""

    def __init__(self, scale: float):
        self.scale = scale
        self.held = 0
        self.batches: list[int] = []

    @contextlib.contextmanager
    def hold(self):
        self.held += 1
        try:
            yield self
        finally:
            self.held -= 1

    def launch(self, inputs):
        assert self.held, "launch outside hold()"
        self.batches.append(inputs["sample"].shape[0])
        eps = inputs["sample"] * self.scale + inputs["timestep"].reshape(-1, 1, 1, 1)
        return SimpleNamespace(result=lambda copy=True: {"noise_pred": eps})

    def run_torch(self, inputs, copy=True):
        with self.hold():
            return self.launch(inputs).result(copy=copy)


def test_trt_denoiser_batches_same_weights_and_splits_different_ones():
    from craft_serving.trt_denoiser import TrtDenoiser

    base, variant = _FakeSession(1.0), _FakeSession(3.0)
    denoise = TrtDenoiser(lambda v: base if v.is_base else variant)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor(7.0)
    cond = {"encoder_hidden_states": torch.randn(1, 77, 32)}
    uncond = {"encoder_hidden_states": torch.randn(1, 77, 32)}
    dog = Variant("dog", 1.0)
    # ACFG: two weight sets -> one batch-1 call on each session, results in call order
    eps_c, eps_u = denoise([UNetCall(x, t, cond, dog), UNetCall(x, t, uncond, BASE)])
    assert base.batches == [1] and variant.batches == [1]
    torch.testing.assert_close(eps_c, x * 3 + 7)
    torch.testing.assert_close(eps_u, x + 7)
    # CFG: one weight set -> one batch-2 call, split back per call
    eps_c, eps_u = denoise([UNetCall(x, t, cond, dog), UNetCall(x * 2, t, uncond, dog)])
    assert variant.batches == [1, 2]
    torch.testing.assert_close(eps_c, x * 3 + 7)
    torch.testing.assert_close(eps_u, x * 6 + 7)
    # serial mode gives the same
    serial = TrtDenoiser({BASE: base, dog: variant}, concurrent=False)
    torch.testing.assert_close(serial([UNetCall(x, t, cond, dog)])[0], x * 3 + 7)


def test_run_batched_torch_groups_by_shape_and_respects_max_batch():
    from craft_serving.batching import run_batched

    calls = []

    def run(inputs):
        calls.append(inputs["x"].shape[0])
        return {"y": inputs["x"] * 2}

    reqs = [{"x": torch.full((n, 3, s), float(i))} for i, (n, s) in enumerate([(1, 4), (2, 4), (1, 5), (3, 4), (2, 4)])]
    out = run_batched(run, reqs, max_batch=4, concat=torch.cat)
    for req, res in zip(reqs, out):
        torch.testing.assert_close(res["y"], req["x"] * 2)
    # shape 4: sizes 1, 2, 3, 2 in order -> chunks (1+2), (3), (2); shape 5: (1)
    assert sorted(calls) == [1, 2, 3, 3]
    assert max(calls) <= 4


# ---------------------------------------------------------------------------------------------
# GPU: exported tiny repositories with TensorRT engines
# ---------------------------------------------------------------------------------------------

def _recipe(demo_dir: Path, arch: str, loras: list[str], path: Path) -> Path:
    from craft_reference.demo import recipe_text

    path.write_text(recipe_text(arch, loras, demo_dir))
    return path


@pytest.fixture(scope="module")
def trt_repos(demo_dir, tmp_path_factory):
    """Per arch: (repo, recipe, manifest view), exported with --runtime tensorrt --precision fp16."""
    pytest.importorskip("tensorrt")
    from craft_export.exporter import ExportOptions, export_repository
    from craft_serving.manifest import read_manifest

    root = tmp_path_factory.mktemp("trt")
    out = {}
    for arch in ("sd15", "sdxl"):
        recipe = _recipe(demo_dir, arch, ["dog", "watercolor"], root / f"{arch}.toml")
        export_repository(ExportOptions(recipe=recipe, out=root / arch, runtime="tensorrt", precision="fp16",
                                        runner="native", keep_onnx=True))  # the refit test rebuilds from them
        out[arch] = (root / arch, recipe, read_manifest(root / arch))
    return out


def _specs(ref_pipes, arch, max_batch=8):
    from craft_export.network_specs import network_specs

    return network_specs(arch, ref_pipes[arch].parts, max_batch=max_batch)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


CASES = [((64, 64), 1, 1), ((128, 128), 2, 2), ((64, 128), 3, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_trt_session_matches_onnxruntime(trt_repos, ref_pipes, arch):
    from craft_export.onnx_export import example_inputs
    from craft_export.ort import OrtSession
    from craft_export.trt_session import TrtSession

    repo, _, view = trt_repos[arch]
    spec = _specs(ref_pipes, arch)["unet"]
    folder = repo / view.model_for(BASE) / "1"
    trt, ort = TrtSession(folder / "model.plan"), OrtSession(folder / "model.onnx")
    assert trt.input_names == spec.input_names and trt.output_names == ["noise_pred"]
    for hw, batch, seed in CASES:
        inputs = {k: v.numpy() for k, v in example_inputs(spec, hw=hw, batch=batch, seed=seed).items()}
        ref = ort(inputs)["noise_pred"]
        triton_style = {**inputs, "timestep": inputs["timestep"].reshape(-1, 1)}  # (B, 1) as Triton sends it
        trt(triton_style)  # allocates this shape's cached outputs
        for binding in trt._bindings.values():  # poison them: the next call must write every element
            for t in binding.outputs.values():
                t.fill_(float("nan"))
        got = trt(triton_style)["noise_pred"]
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.isfinite(got).all()
        assert _rel(got, ref) < 1e-2, f"{hw} b{batch}: rel L2 {_rel(got, ref):.2e}"
        # the torch path on CUDA tensors computes the same thing, with no host round trip
        cuda = {k: torch.from_numpy(v).cuda() for k, v in inputs.items()}
        out = trt.run_torch(cuda)["noise_pred"]
        assert out.is_cuda
        np.testing.assert_allclose(out.cpu().numpy(), got, rtol=1e-3, atol=1e-3)
    assert len(trt._bindings) == len(CASES)


@pytest.mark.gpu
def test_fp16_unet_keeps_the_time_embeddings_in_fp32(trt_repos, ref_pipes):
    """TensorRT's parser names layers after the ONNX nodes, so trt_policy's patterns find the
    sinusoidal embeddings; the fp16 engine at the largest timestep and SDXL time_ids (where fp16
    arguments of sin / cos would be off by a whole period) matches ONNX Runtime."""
    import tensorrt as trt

    from craft_export.onnx_export import example_inputs
    from craft_export.ort import OrtSession
    from craft_export.tensorrt_build import EngineBuild
    from craft_export.trt_session import TrtSession

    repo, _, view = trt_repos["sdxl"]
    folder = repo / view.model_for(BASE) / "1"
    build = EngineBuild("fp16")
    builder = trt.Builder(build.logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, build.logger)
    assert parser.parse_from_file(str(folder / "model.onnx"))
    kept = build._keep_fp32(network, builder.create_builder_config())
    for module in ("time_proj", "add_time_proj"):
        for op in ("Mul", "Sin", "Cos"):
            assert any(f"/{module}/{op}" in name for name in kept), (module, op, kept)
    spec = _specs(ref_pipes, "sdxl")["unet"]
    inputs = {k: v.numpy() for k, v in example_inputs(spec, hw=(128, 128), batch=2, seed=9).items()}
    inputs["timestep"] = np.full_like(inputs["timestep"], 999.0)
    inputs["time_ids"] = np.tile(np.array([1536, 1024, 0, 0, 1536, 1024], np.float32), (2, 1))
    ref = OrtSession(folder / "model.onnx")(inputs)["noise_pred"]
    got = TrtSession(folder / "model.plan")(inputs)["noise_pred"]
    assert np.isfinite(got).all() and _rel(got, ref) < 1e-2, _rel(got, ref)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_across_shape_changes(trt_repos, ref_pipes):
    from craft_export.onnx_export import example_inputs
    from craft_export.trt_session import TrtSession

    repo, _, view = trt_repos["sdxl"]
    spec = _specs(ref_pipes, "sdxl")["unet"]
    plan = repo / view.model_for(BASE) / "1" / "model.plan"
    eager, graphed = TrtSession(plan), TrtSession(plan, cuda_graphs=True, graph_warmup=1)
    order = [CASES[0], CASES[1], CASES[0], CASES[0], CASES[1], CASES[0]]
    for i, (hw, batch, _) in enumerate(order):
        # fresh values every call: a replay must read this call's inputs, not the captured ones
        inputs = {k: v.cuda() for k, v in example_inputs(spec, hw=hw, batch=batch, seed=100 + i).items()}
        want = eager.run_torch(inputs)["noise_pred"]
        got = graphed.run_torch(inputs)["noise_pred"]
        # same engine and kernels; the tolerance only allows for non-deterministic reductions -
        # a replay that read stale (captured) inputs would be off by O(1)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    captured = [b.key for b in graphed._bindings.values() if b.graph is not None]
    assert len(captured) == 2, f"expected both shapes captured, got {captured} ({graphed.describe()})"


@pytest.mark.gpu
def test_refit_engine_equals_fresh_build(trt_repos, ref_pipes):
    from craft_export.onnx_export import example_inputs
    from craft_export.specs import ImageRange
    from craft_export.tensorrt_build import EngineBuild
    from craft_export.trt_policy import profile_batch
    from craft_export.trt_session import TrtSession

    repo, _, view = trt_repos["sd15"]
    models = json.loads((repo / "manifest.json").read_text())["models"]
    refits = [name for name, rec in models.items() if rec.get("trt_build") == "refit"]
    assert refits, models
    e = view.engine
    spec = _specs(ref_pipes, "sd15", max_batch=e.max_batch)["unet"]
    image_range = ImageRange((e.min_size,) * 2, (e.opt_size,) * 2, (e.max_size,) * 2)
    base = TrtSession(repo / view.model_for(BASE) / "1" / "model.plan")
    for name in refits[:2]:
        folder = repo / name / "1"
        refit = TrtSession(folder / "model.plan")
        profile = spec.profile(image_range, profile_batch("unet", spec.max_batch))  # as craft export builds it
        fresh = TrtSession(EngineBuild("fp16").build(folder / "model.onnx", profile, refittable=True))
        for hw, batch, seed in CASES[:2]:
            inputs = {k: v.cuda() for k, v in example_inputs(spec, hw=hw, batch=batch, seed=seed).items()}
            a = refit.run_torch(inputs)["noise_pred"].double()
            b = fresh.run_torch(inputs)["noise_pred"].double()
            c = base.run_torch(inputs)["noise_pred"].double()
            diff = float((a - b).norm() / b.norm())
            assert float((a - b).abs().max()) < 5e-2 and diff < 1e-2, f"{name} {hw}: refit vs fresh rel L2 {diff:.2e}"
            # and the refit really changed the weights: W_init's output is far away
            assert float((c - b).norm() / b.norm()) > 10 * diff + 1e-3, name


@pytest.mark.gpu
def test_concurrent_runs_equal_serial_runs(trt_repos, ref_pipes):
    from craft_export.onnx_export import example_inputs
    from craft_export.trt_session import TrtSession
    from craft_serving.trt_denoiser import run_concurrent

    repo, _, view = trt_repos["sd15"]
    spec = _specs(ref_pipes, "sd15")["unet"]
    names = [view.model_for(BASE), view.model_for(Variant("dog", 1.0, "watercolor", 1.0))]
    sessions = [TrtSession(repo / n / "1" / "model.plan") for n in names]
    inputs = [{k: v.cuda() for k, v in example_inputs(spec, hw=(64, 64), batch=1, seed=s).items()} for s in (1, 2)]
    together = run_concurrent(list(zip(sessions, inputs)))
    for session, inp, out in zip(sessions, inputs, together):
        torch.testing.assert_close(out["noise_pred"], session.run_torch(inp)["noise_pred"], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError):
        run_concurrent([(sessions[0], inputs[0]), (sessions[0], inputs[1])])


REQUESTS = {
    "acfg_both": dict(prompt="a dog <c> in watercolor style <s>", content="dog", style="watercolor"),
    "cfg_both": dict(prompt="a dog <c> in watercolor style <s>", content="dog", style="watercolor", mode="cfg"),
    "content_only": dict(prompt="a dog <c> on a beach", content="dog"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("case", list(REQUESTS))
def test_images_with_tensorrt_match_fp32_reference(trt_repos, ref_pipes, arch, case):
    """craft_ops.sampling.sample with TensorRT fp16 engines vs the fp32 PyTorch reference: PSNR >= 30 dB.

    (a) the reference pipeline with its UNet calls replaced by TrtDenoiser (CUDA, both ACFG
    branches concurrently); (b) the served pipeline code (PipelineRuntime) with every network -
    text encoders, UNet variants, VAE decoder - a TrtSession called with numpy, as EngineModel does.
    """
    from craft_export.recipe import load_recipe
    from craft_export.trt_session import TrtSession
    from craft_reference.pipeline import ReferencePipeline
    from craft_serving.runtime import PipelineRuntime
    from craft_serving.trt_denoiser import TrtDenoiser

    repo, recipe, view = trt_repos[arch]
    kw = dict(REQUESTS[case])
    request = GenerateRequest(prompts=(kw.pop("prompt"),), seed=5, **kw)
    want = ref_pipes[arch].generate(request)

    sessions: dict[str, TrtSession] = {}

    def session(model: str) -> TrtSession:
        if model not in sessions:
            sessions[model] = TrtSession(repo / model / "1" / "model.plan")
        return sessions[model]

    hybrid = ReferencePipeline.from_recipe(load_recipe(recipe))
    hybrid.denoise = TrtDenoiser(lambda v: session(view.model_for(v)))
    got = hybrid.generate(request)
    assert got.shape == want.shape
    assert _psnr(got, want) >= 30.0, f"TrtDenoiser: PSNR {_psnr(got, want):.1f} dB"

    def infer_many(calls):  # PipelineRuntime wants torch tensors back; TrtSession.__call__ answers numpy
        outs = [session(c.model)(dict(c.inputs)) for c in calls]
        return [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()} for out in outs]

    runtime = PipelineRuntime.from_repository(repo, infer_many)
    served, _ = runtime.generate(request)
    assert served.shape == want.shape
    assert _psnr(served, want) >= 30.0, f"all-TensorRT pipeline: PSNR {_psnr(served, want):.1f} dB"
