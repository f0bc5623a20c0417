"""What the TensorRT / CUDA serving path decides, checked on CPU (issue 18; no GPU, no tensorrt).

* the engine runner (EngineModel, ``craft_io=dlpack``) moves every input to its instance's device
  before batching, and ``run_batched`` never concatenates tensors of two devices (torch's ``meta``
  device stands in for a GPU);
* the pipeline's BLS path makes its DLPack inputs contiguous before it synchronises the stream;
* per-network engine precision (SDXL VAE decoder fp32 under fp16), UNet profile ``opt`` batch 2,
  the fp32 layer selection on the names of an exported tiny SDXL UNet, and the engine-vs-ONNX
  Runtime acceptance check;
* ``benchmarks/gpu_bench.py`` counts UNet FLOPs on the model it times.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tiny_specs(arch: str, unet_config=None) -> dict:
    """The tiny models' network specs, from their configs alone."""
    from craft_export.network_specs import network_specs
    from craft_reference.tiny import TINY_CONFIGS

    cfg = TINY_CONFIGS[arch]
    configs = {"unet": unet_config or cfg["unet"], "vae": cfg["vae"]}
    for name, enc in zip(("text_encoder", "text_encoder_2"), cfg["text_encoders"]):
        configs[name] = {**enc, "vocab_size": 1000}
    return network_specs(arch, configs)


# ---------------------------------------------------------------------------------------------
# item 2: mixed-device batching
# ---------------------------------------------------------------------------------------------

def _recording_cat(seen: list):
    def cat(tensors):
        devices = {t.device for t in tensors}
        assert len(devices) == 1, f"torch.cat across devices {devices}"
        seen.append(devices.pop())
        return torch.cat(tensors)
    return cat


def test_run_batched_never_concatenates_across_devices():
    from craft_serving.batching import run_batched

    calls = []

    def run(inputs):
        calls.append((inputs["x"].device.type, inputs["x"].shape[0]))
        return {"y": inputs["x"] * 2}

    reqs = [{"x": torch.ones(1, 3, device=d)} for d in ("cpu", "meta", "cpu", "meta", "meta")]
    seen: list = []
    # no device given: grouped by device, one call per device
    out = run_batched(run, reqs, max_batch=8, concat=_recording_cat(seen))
    assert sorted(calls) == [("cpu", 2), ("meta", 3)]
    assert [o["y"].device.type for o in out] == ["cpu", "meta", "cpu", "meta", "meta"]
    # the instance's device given: every input moved there first, then one batch of 5
    calls.clear()
    out = run_batched(run, reqs, max_batch=8, concat=_recording_cat(seen), device="meta")
    assert calls == [("meta", 5)]
    assert all(o["y"].device.type == "meta" and o["y"].shape == (1, 3) for o in out)


class _PbTensor:
    def __init__(self, name, value):
        self._name, self.value = name, value

    def name(self):
        return self._name

    def to_dlpack(self):
        return self.value  # craft_serving.triton_model.from_dlpack is the identity in these tests


def _fake_pb():
    class TritonError(Exception):
        INVALID_ARG = INTERNAL = UNKNOWN = 0

        def __init__(self, msg, code=0):
            super().__init__(msg)

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error_ = list(output_tensors), error

    return SimpleNamespace(
        Tensor=SimpleNamespace(from_dlpack=lambda name, value: _PbTensor(name, value)),
        TritonError=TritonError, InferenceResponse=InferenceResponse,
        get_input_tensor_by_name=lambda request, name: request.get(name),
    )


def test_engine_runner_moves_every_input_to_the_instance_device(monkeypatch):
    """Requests whose tensors arrive on the host and on the "GPU" (meta) run as one batch there."""
    from craft_serving import triton_model

    class Session:  # a TrtSession on device "meta"
        device = torch.device("meta")
        input_names = ["x"]
        input_ranks = {"x": 2}

        def __init__(self):
            self.calls = []

        def run_torch(self, inputs):
            self.calls.append({k: (v.device.type, v.shape[0]) for k, v in inputs.items()})
            return {"y": inputs["x"] + 1}

    session = Session()
    monkeypatch.setattr(triton_model, "OrtSession", lambda path, threads: session)
    monkeypatch.setattr(triton_model, "from_dlpack", lambda v: v)
    monkeypatch.setattr(triton_model, "to_dlpack", lambda v: v)
    config = {"input": [{"name": "x"}], "output": [{"name": "y"}], "max_batch_size": 8,
              "parameters": {"craft_io": {"string_value": "dlpack"}}}
    args = {"model_config": json.dumps(config), "model_repository": "/nonexistent", "model_version": "1"}
    model = triton_model.EngineModel(_fake_pb(), args)
    requests = [{"x": _PbTensor("x", torch.ones(n, 3, device=d))} for n, d in ((1, "cpu"), (2, "meta"), (1, "cpu"))]
    responses = model.execute(requests)
    assert session.calls == [{"x": ("meta", 4)}]
    assert [r.error_ for r in responses] == [None] * 3
    assert [r.output_tensors[0].value.shape[0] for r in responses] == [1, 2, 1]


# ---------------------------------------------------------------------------------------------
# item 4: contiguous before synchronise in the BLS path
# ---------------------------------------------------------------------------------------------

def test_bls_makes_inputs_contiguous_before_it_synchronises(monkeypatch):
    from craft_serving import triton_model
    from craft_serving.runtime import NetCall

    events: list = []

    class Stream:
        def synchronize(self):
            events.append("synchronize")

    def to_dlpack(value):
        events.append(("dlpack", value.is_contiguous()))
        return value

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(triton_model, "to_dlpack", to_dlpack)

    class Request:
        def __init__(self, **kw):
            self.kw = kw

        async def async_exec(self):
            events.append("exec")
            return SimpleNamespace(has_error=lambda: False)

    pb = _fake_pb()
    pb.InferenceRequest = Request
    model = triton_model.PipelineModel.__new__(triton_model.PipelineModel)  # only what _bls reads
    model.pb, model._on_gpu, model._bls_extra = pb, True, {}
    model.settings = SimpleNamespace(device="meta")
    # a multi-prompt request's negative embeddings: one row expanded to three (a view; .contiguous() copies)
    negative = torch.zeros(1, 77, 8, device="meta").expand(3, -1, -1)
    calls = [NetCall("unet_a", {"encoder_hidden_states": negative, "timestep": torch.zeros(3, device="meta")}, ()),
             NetCall("unet_b", {"encoder_hidden_states": negative}, ())]
    assert not negative.is_contiguous()
    asyncio.run(model._bls(calls))
    dlpacks = [e for e in events if isinstance(e, tuple)]
    assert len(dlpacks) == 3 and all(contiguous for _, contiguous in dlpacks)
    first_sync = events.index("synchronize")
    assert events.count("synchronize") == 1
    assert all(events.index(e) < first_sync for e in dlpacks), events
    assert all(events.index(e) > first_sync for e in events if e == "exec"), events


# ---------------------------------------------------------------------------------------------
# items 5 and 7: per-network precision, profile batch, the engine check
# ---------------------------------------------------------------------------------------------

def test_engine_precision_builds_the_sdxl_vae_decoder_in_fp32():
    from craft_export.trt_policy import TensorRTError, engine_precision

    assert engine_precision("sdxl", "vae_decoder", "fp16") == "fp32"
    assert engine_precision("sdxl", "unet", "fp16") == "fp16"
    assert engine_precision("sdxl", "text_encoder_2", "fp16") == "fp16"
    assert engine_precision("sd15", "vae_decoder", "fp16") == "fp16"
    assert engine_precision("sdxl", "vae_decoder", "bf16") == "bf16"  # bf16 has fp32's range
    assert engine_precision("sdxl", "vae_decoder", "fp32") == "fp32"
    with pytest.raises(TensorRTError, match="'int8'"):
        engine_precision("sdxl", "unet", "int8")


def test_unet_profile_is_tuned_for_batch_2():
    from craft_export.specs import ImageRange
    from craft_export.trt_policy import profile_batch

    assert (profile_batch("unet", 8).min, profile_batch("unet", 8).opt, profile_batch("unet", 8).max) == (1, 2, 8)
    assert profile_batch("unet", 1).opt == 1
    assert profile_batch("vae_decoder", 8).opt == 1 and profile_batch("text_encoder", 4).max == 4
    spec = _tiny_specs("sd15")["unet"]
    prof = spec.profile(ImageRange((64, 64), (128, 128), (256, 256)), profile_batch("unet", spec.max_batch))
    assert prof["sample"].opt == (2, 4, 16, 16) and prof["sample"].min[0] == 1
    assert prof["encoder_hidden_states"].opt[0] == 2


def test_engine_check_fails_on_non_finite_or_large_errors():
    from craft_export.trt_policy import ENGINE_TOLERANCE, TensorRTError, check_engine_error, output_errors

    rng = np.random.default_rng(0)
    ref = {"image": rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
           "noise": rng.standard_normal((2, 4)).astype(np.float32)}
    scale = float(np.abs(ref["image"]).max())
    close = {"image": ref["image"] + 0.01 * scale, "noise": ref["noise"]}
    errors = output_errors(close, ref)
    assert math.isclose(errors["image"]["rel_err"], 0.01, rel_tol=1e-4) and errors["noise"]["max_abs_err"] == 0
    assert math.isclose(check_engine_error("vae", "fp16", errors), 0.01, rel_tol=1e-4)
    # the same error is too much for an fp32 (TF32) engine's tolerance? no: 1e-2 is its bound
    assert ENGINE_TOLERANCE["fp32"] <= ENGINE_TOLERANCE["fp16"] <= ENGINE_TOLERANCE["bf16"]
    far = {"image": ref["image"] + 0.2 * scale, "noise": ref["noise"]}
    with pytest.raises(TensorRTError, match=r"vae: fp16 engine output 'image' differs .* > tolerance 0\.05"):
        check_engine_error("vae", "fp16", output_errors(far, ref))
    for bad in (np.nan, np.inf):
        broken = {"image": ref["image"].copy(), "noise": ref["noise"]}
        broken["image"][1, 2, 3, 4] = bad  # one element: a black image starts like this
        errors = output_errors(broken, ref)
        assert not math.isfinite(errors["image"]["max_abs_err"])
        with pytest.raises(TensorRTError, match="'image' is not finite"):
            check_engine_error("vae", "fp32", errors)
    with pytest.raises(TensorRTError, match="no output 'noise'"):
        output_errors({"image": ref["image"]}, ref)
    with pytest.raises(TensorRTError, match="shape"):
        output_errors({"image": ref["image"][:1], "noise": ref["noise"]}, ref)


def test_build_engine_applies_the_policy_and_fails_the_export_on_a_bad_engine(monkeypatch, tmp_path):
    """build_engine's wiring, with TensorRT itself replaced (no GPU here): the precision and profile
    each network is built with, the manifest fields, and the failure on a NaN output."""
    from craft_export import tensorrt_build
    from craft_export.options import ModelJob
    from craft_export.specs import ImageRange
    from craft_export.trt_policy import TensorRTError
    from craft_ops.aggregate import BASE

    builds = []

    class FakeBuild:
        def __init__(self, precision):
            self.precision = precision

        def build(self, onnx_path, profile, *, refittable):
            builds.append((self.precision, {k: p.opt[0] for k, p in profile.items()}, refittable))
            return b"plan"

    result = {"image": {"max_abs_err": 1e-3, "ref_max_abs": 1.0, "rel_err": 1e-3}}
    monkeypatch.setattr(tensorrt_build, "EngineBuild", FakeBuild)
    monkeypatch.setattr(tensorrt_build, "_compare_with_onnx", lambda *a: result)
    specs = _tiny_specs("sdxl")
    options = SimpleNamespace(precision="fp16")
    images = ImageRange((64, 64), (128, 128), (256, 256))
    record = tensorrt_build.build_engine(ModelJob("vae_decoder", "vae_decoder", "k"), tmp_path / "m.onnx",
                                         specs["vae_decoder"], options, tmp_path, image_range=images)
    assert builds[-1] == ("fp32", {"latent": 1}, False)
    assert record["trt_precision"] == "fp32" and record["trt_rel_err_vs_onnx"] == 1e-3
    assert record["trt_tolerance"] == 1e-2 and (tmp_path / "model.plan").read_bytes() == b"plan"
    result = {"noise_pred": {"max_abs_err": 0.01, "ref_max_abs": 2.0, "rel_err": 0.005}}
    tensorrt_build.build_engine(ModelJob("unet_base", "unet", "k", (BASE,)), tmp_path / "m.onnx", specs["unet"],
                                options, tmp_path, image_range=images)
    precision, opt_batch, refittable = builds[-1]
    assert precision == "fp16" and refittable and set(opt_batch.values()) == {2}
    result = {"noise_pred": {"max_abs_err": math.nan, "ref_max_abs": 2.0, "rel_err": math.nan}}
    with pytest.raises(TensorRTError, match="unet_base: fp16 engine output 'noise_pred' is not finite"):
        tensorrt_build.build_engine(ModelJob("unet_base", "unet", "k", (BASE,)), tmp_path / "m.onnx", specs["unet"],
                                    options, tmp_path, image_range=images)


# ---------------------------------------------------------------------------------------------
# item 6: the layers kept in fp32, selected on an exported tiny SDXL UNet's node names
# ---------------------------------------------------------------------------------------------

# The tiny SDXL UNet cut to two levels (its export takes a quarter of the time); the modules that
# matter here - time_proj, time_embedding, add_time_proj, add_embedding, the resnets' time_emb_proj -
# are the same.
SMALL_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=1, attention_head_dim=2, cross_attention_dim=64, use_linear_projection=True,
    norm_num_groups=4, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)


@pytest.fixture(scope="module")
def sdxl_unet_node_names(tmp_path_factory) -> list[str]:
    """Node names of a small SDXL UNet exported as ``craft export`` does (``_Baked`` around ``UNetNet``)."""
    import onnx
    from diffusers import UNet2DConditionModel

    from craft_export.model_build import _Baked
    from craft_export.networks import UNetNet
    from craft_export.onnx_export import example_inputs, export_onnx

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SMALL_SDXL_UNET).eval()
    spec = _tiny_specs("sdxl", unet.config)["unet"]
    path = tmp_path_factory.mktemp("sdxl-unet") / "model.onnx"
    export_onnx(_Baked(UNetNet(unet), {}).eval(), spec, example_inputs(spec, hw=(32, 32), batch=2, seed=0), path)
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node]


def test_fp32_layers_are_the_timestep_and_time_ids_embeddings(sdxl_unet_node_names):
    from craft_export.trt_policy import fp32_layer_names

    names = sdxl_unet_node_names
    kept = fp32_layer_names(names, "fp16")
    assert kept == [n for n in names if n in set(kept)]  # network order
    ops = {(n.split("/")[-2], n.split("/")[-1].split("_")[0]) for n in kept}
    # the sinusoids of both embeddings, the products that feed them, and the MLPs after them
    for module in ("time_proj", "add_time_proj"):
        assert {(module, "Sin"), (module, "Cos"), (module, "Mul")} <= ops, sorted(ops)
    assert any("/time_embedding/linear_1/" in n for n in kept) and any("/add_embedding/linear_2/" in n for n in kept)
    # nothing else: the resnets' time_emb_proj (fed the SiLU of the embedding) runs in fp16
    assert any("time_emb_proj" in n for n in names) and not any("time_emb_proj" in n for n in kept)
    assert len(kept) < len(names) // 5
    assert fp32_layer_names(names, "bf16") == kept and fp32_layer_names(names, "fp32") == []
    # TensorRT's parser names extra layers of a node after it: those are matched as well
    assert fp32_layer_names(["/inner/net/unet/time_proj/Sin_1", "time_proj", "/unet/time_projection/Sin"],
                            "fp16") == ["/inner/net/unet/time_proj/Sin_1", "time_proj"]


# ---------------------------------------------------------------------------------------------
# item 8: gpu_bench counts the FLOPs of the model it times
# ---------------------------------------------------------------------------------------------

def test_gpu_bench_counts_unet_flops_on_the_timed_model(monkeypatch):
    from diffusers import UNet2DConditionModel

    from craft_export.networks import UNetNet
    from craft_export.onnx_export import example_inputs
    from craft_reference.tiny import TINY_CONFIGS

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_bench

    unet = UNet2DConditionModel(**TINY_CONFIGS["sd15"]["unet"]).eval()
    spec = _tiny_specs("sd15", unet.config)["unet"]
    net = UNetNet(unet)
    flops = {}
    for side, batch in ((64, 1), (128, 1), (128, 2)):
        inputs = example_inputs(spec, hw=(side, side), batch=batch, seed=0)
        flops[side, batch] = gpu_bench.count_flops(lambda: net(**inputs))
    assert flops[64, 1] > 0
    # 4x the pixels: convolutions 4x, self-attention 16x, the text side's projections 1x; above 4 only
    # when attention is counted (the CPU kernel is not in FlopCounterMode's table: count_flops adds it)
    assert 4.0 < flops[128, 1] / flops[64, 1] < 6.0, flops
    assert math.isclose(flops[128, 2], 2 * flops[128, 1], rel_tol=1e-6)
