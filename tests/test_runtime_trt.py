"""TensorRT for the runtime-LoRA UNet (issue 14), checked on CPU: the optimisation profile of the factor banks.

No GPU and no tensorrt needed: the profile is built from the network's spec (:mod:`craft_export.trt_policy`).
Building an engine needs both; that part skips cleanly here and is unverified until a GPU run.
"""

from __future__ import annotations

import re

import pytest

from craft_export.specs import BatchRange, ImageRange


def _runtime_spec(max_rank: int = 8):
    from craft_export.loading import unet_module_shapes
    from craft_export.network_specs import network_specs
    from craft_export.runtime_export import layout_for
    from craft_export.runtime_network import runtime_spec
    from craft_ops.routing import PRESETS
    from craft_reference.tiny import TINY_CONFIGS
    from diffusers import UNet2DConditionModel

    cfg = TINY_CONFIGS["sd15"]
    unet = UNet2DConditionModel(**cfg["unet"])
    configs = {"unet": cfg["unet"], "vae": cfg["vae"], "text_encoder": {**cfg["text_encoders"][0], "vocab_size": 1000}}
    unet_spec = network_specs("sd15", configs)["unet"]
    layout = layout_for(unet_module_shapes(unet), PRESETS["sd15"], max_rank)
    return runtime_spec(unet_spec, layout), layout, unet_spec


def test_profile_slots_follow_the_cache_budget():
    from craft_export.trt_policy import RUNTIME_MAX_SLOTS, TensorRTError, profile_slots

    one_mib = 2**20
    assert profile_slots(one_mib, cache_mb=10) == BatchRange(2, 10, RUNTIME_MAX_SLOTS)
    assert profile_slots(one_mib, cache_mb=1).opt == 2  # never below slot 0 + one LoRA
    assert profile_slots(1, cache_mb=1).opt == RUNTIME_MAX_SLOTS  # capped like the cache
    with pytest.raises(TensorRTError, match="slot_bytes"):
        profile_slots(0)
    with pytest.raises(TensorRTError, match="cache_mb"):
        profile_slots(one_mib, cache_mb=0)


def test_policy_constants_match_the_runner():
    """trt_policy restates the runner's cache cap and default budget (export may not import serving)."""
    from craft_export.trt_policy import RUNTIME_CACHE_MB, RUNTIME_MAX_SLOTS, profile_slots
    from craft_serving.lora_cache import MAX_SLOTS, slots_for_budget
    from craft_serving.runtime_unet import DEFAULT_CACHE_MB

    assert (RUNTIME_MAX_SLOTS, RUNTIME_CACHE_MB) == (MAX_SLOTS, DEFAULT_CACHE_MB)
    _, layout, _ = _runtime_spec()
    slot_bytes = 4 * (layout.slot_floats("content") + layout.slot_floats("style"))
    for mb in (0.01, 1.0, DEFAULT_CACHE_MB):  # opt is the slot count the runner's cache has (it passes all banks)
        assert profile_slots(slot_bytes, mb).opt == slots_for_budget(layout, mb)


def test_runtime_engine_profile():
    from craft_export.trt_policy import engine_profile, profile_slots

    spec, layout, unet_spec = _runtime_spec(max_rank=8)
    images = ImageRange((64, 64), (128, 128), (256, 256))
    profile = engine_profile(spec, "unet_lora", images, cache_mb=1.0)
    assert set(profile) == set(spec.input_names)  # every input, the banks included
    slots = profile_slots(4 * (layout.slot_floats("content") + layout.slot_floats("style")), 1.0)
    for i, m in enumerate(layout.modules):
        a_shape, b_shape = m.bank_shapes(8, 1)
        for name, shape in ((f"lora_A.{i}", a_shape), (f"lora_B.{i}", b_shape)):
            p = profile[name]
            assert (p.min[0], p.opt[0], p.max[0]) == (slots.min, slots.opt, slots.max), name
            assert p.min[1:] == p.opt[1:] == p.max[1:] == shape[1:], name  # rank and widths are static
    for name in ("content_index", "content_scale", "style_index", "style_scale"):
        assert profile[name].min == (1,) and profile[name].opt == (2,) and profile[name].max == (spec.max_batch,)
    sample = profile["sample"]
    assert sample.opt == (2, 4, 16, 16) and sample.min == (1, 4, 8, 8) and sample.max[2:] == (32, 32)
    # the runtime network's UNet inputs get the plain UNet engine's profile
    plain = engine_profile(unet_spec, "unet", images)
    assert all(profile[name] == p for name, p in plain.items())


def test_runtime_tensorrt_export_is_accepted():
    """--lora-mode runtime --runtime tensorrt passes option checks (it builds the dense graph's engine)."""
    from pathlib import Path

    from craft_export.options import ExportOptions

    opts = ExportOptions(recipe=Path("r.toml"), out=Path("o"), runtime="tensorrt", lora_mode="runtime")
    assert opts.pairs == "none"


def test_runtime_engine_builds_on_a_gpu(tmp_path):
    """Needs tensorrt and a CUDA GPU (skips otherwise): build the dense runtime graph's engine, compare with ORT."""
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from types import SimpleNamespace

    from craft_export.onnx_export import export_onnx
    from craft_export.runtime_export import runtime_examples
    from craft_export.runtime_network import RuntimeUNetNet
    from craft_export.tensorrt_build import build_engine
    from craft_export.loading import load_pipeline_parts
    from craft_export.networks import UNetNet
    from craft_reference.tiny import build_tiny_pipeline

    parts = load_pipeline_parts(build_tiny_pipeline("sd15", tmp_path / "sd15", seed=0))
    spec, _, _ = _runtime_spec()
    net = RuntimeUNetNet(UNetNet(parts.unet).eval(), spec, compact=False).eval()
    onnx_path = tmp_path / "unet_lora" / "1" / "model.onnx"
    export_onnx(net, spec, runtime_examples(spec, (64, 64), 2, 3, 0), onnx_path)
    job = SimpleNamespace(name="unet_lora", network="unet_lora", variants=())
    record = build_engine(job, onnx_path, spec, SimpleNamespace(precision="fp32"), onnx_path.parent,
                          image_range=ImageRange((64, 64), (64, 64), (128, 128)))
    assert record["trt_build"] == "build" and record["trt_rel_err_vs_onnx"] <= record["trt_tolerance"]


def test_tensorrt_repositories_are_served_by_the_one_runner(tmp_path):
    """--runtime tensorrt with the Python runner: every UNet weight set from the ``unet`` runner model (one
    stub, one CUDA context), a GPU instance with no merged or fed sessions; the native backends keep a
    model per variant."""
    from craft_export.network_specs import network_specs
    from craft_export.unet_runner import served_by_runner, write_runner
    from craft_reference.tiny import TINY_CONFIGS

    assert served_by_runner({"runner": "python", "runtime": "onnxruntime"})
    assert served_by_runner({"runner": "python", "runtime": "tensorrt", "lora_mode": "runtime"})
    assert served_by_runner({"runner": "python", "runtime": "tensorrt", "lora_mode": "baked"})
    assert not served_by_runner({"runner": "native", "runtime": "tensorrt", "lora_mode": "runtime"})
    cfg = TINY_CONFIGS["sd15"]
    configs = {"unet": cfg["unet"], "vae": cfg["vae"], "text_encoder": {**cfg["text_encoders"][0], "vocab_size": 1000}}
    unet = network_specs("sd15", configs)["unet"]
    for runtime, kind, merged in (("tensorrt", "KIND_GPU", "0"), ("onnxruntime", "KIND_CPU", "4")):
        write_runner(tmp_path / runtime, unet, 8, runtime=runtime)
        text = (tmp_path / runtime / "config.pbtxt").read_text()
        params = dict(re.findall(r'key: "(\w+)"\s*value \{\s*string_value: "([^"]*)"', text))
        assert f"kind: {kind}" in text, text
        assert params["craft_runtime"] == runtime and params["merged_variants"] == merged, params
        assert params["fed_variants"] == ("0" if runtime == "tensorrt" else "8"), params


def test_runner_device_follows_the_instance():
    from craft_serving.unet_model import _device

    gpu = {"model_instance_kind": "GPU", "model_instance_device_id": "1"}
    assert _device(gpu, {"craft_runtime": "tensorrt"}) == 1
    assert _device(gpu, {"craft_runtime": "onnxruntime"}) is None
    assert _device({"model_instance_kind": "CPU"}, {"craft_runtime": "tensorrt"}) is None


def test_served_runtime_tensorrt_repository_on_a_gpu(demo_dir, ref_pipes, tmp_path):
    """Needs tensorrt and a CUDA GPU (skips otherwise). A runtime-LoRA repository exported for TensorRT
    (fp32 engines) and run by the ``unet`` runner's code (UNetWeights over the engines, the LoRA cache
    on the GPU): a batch mixing LoRAs and gates equals the ONNX Runtime runner of the same recipe, and
    the served pipeline's image equals the baked reference within 2/255."""
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    import numpy as np

    from craft_export.exporter import ExportOptions, export_repository
    from craft_export.network_specs import network_specs
    from craft_export.onnx_export import example_inputs
    from craft_ops.aggregate import Variant
    from craft_ops.request import GenerateRequest
    from craft_serving.local_infer import LocalInfer
    from craft_serving.runtime import PipelineRuntime
    from craft_serving.unet_weights import UNetWeights

    repos = {}
    for runtime in ("tensorrt", "onnxruntime"):
        repos[runtime] = tmp_path / runtime
        export_repository(ExportOptions(recipe=demo_dir / "recipe-sd15.toml", out=repos[runtime], lora_mode="runtime",
                                        max_rank=8, runtime=runtime, precision="fp32", runner="python",
                                        pairs="dog+watercolor"))
    trt_repo = repos["tensorrt"]
    assert (trt_repo / "unet" / "config.pbtxt").is_file() and (trt_repo / "unet_lora" / "1" / "model.plan").is_file()
    on_gpu, on_cpu = UNetWeights(trt_repo), UNetWeights(repos["onnxruntime"], merged_variants=0)
    assert on_gpu.runtime.cache.banks["lora_A.0"].is_cuda
    spec = network_specs("sd15", ref_pipes["sd15"].parts)["unet"]
    feed = example_inputs(spec, hw=(64, 64), batch=5, seed=1)
    variants = [Variant("dog", 0.6, "fire", 1.0), Variant(), Variant("bull", 1.0, None, 0.0),
                Variant(None, 0.0, "fire", 0.3), Variant("dog", 1.0, "watercolor", 1.0)]  # the last: baked
    got, want = on_gpu(feed, variants), on_cpu(feed, variants)
    assert not got.is_cuda and got.shape == want.shape
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= 1e-3 * scale, float((got - want).abs().max())
    request = GenerateRequest(prompts=("a bull <c> in fire style <s>",), content="bull", style="fire", seed=5,
                              steps=4, gamma_s=0.7)
    served, _ = PipelineRuntime.from_repository(trt_repo, LocalInfer(trt_repo)).generate(request)
    reference = ref_pipes["sd15"].generate(request)
    assert int(np.abs(served.astype(np.int16) - reference.astype(np.int16)).max()) <= 2
