"""Export memory: variants baked without a dense delta cache, derived ONNX written straight from the
tensors, and a network's weights moved onto its exported file (byte-equal, same outputs)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from craft_ops.aggregate import Variant

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd15(demo_dir):
    from craft_export.exporter import ExportOptions, load_everything

    return load_everything(ExportOptions(recipe=demo_dir / "recipe-sd15.toml", out=demo_dir / "unused"))


def test_uncached_bake_equals_cached_and_keeps_no_deltas(sd15):
    from craft_export.bake import VariantBaker

    fresh = VariantBaker(sd15.baker.W_init, sd15.models.shapes, sd15.recipe.routing, sd15.loras.values())
    variant = Variant("dog", 0.7, "watercolor", 1.0)
    streamed = fresh.params_for(variant, cache=False)
    assert fresh._deltas == {} and fresh._params == {}  # nothing kept
    cached = fresh.params_for(variant)
    assert streamed.keys() == cached.keys() and streamed
    for name in cached:
        assert torch.equal(streamed[name], cached[name]), name


def test_derived_variant_holds_the_baked_bytes(sd15, tmp_path):
    from craft_export.model_build import network_module
    from craft_export.network_specs import network_specs
    from craft_export.onnx_export import example_inputs, export_onnx
    from craft_export.onnx_files import onnx_initializer_hashes
    from craft_export.onnx_variants import derive_variant
    from craft_export.options import ModelJob

    spec = network_specs("sd15", sd15.parts, max_batch=2)["unet"]
    base = tmp_path / "base" / "model.onnx"
    export_onnx(sd15.nets.unet, spec, example_inputs(spec, hw=(64, 64), batch=2), base)
    _, params = network_module(sd15.nets, sd15.baker, ModelJob("v", "unet", "k", (Variant("dog", 1.0, None, 0.0),)))
    overrides = dict(params)  # UNetNet's parameter names are the base graph's initializer names
    out = tmp_path / "variant" / "model.onnx"
    out.parent.mkdir()
    derive_variant(base, overrides, out)
    got, before = onnx_initializer_hashes(out), onnx_initializer_hashes(base)
    assert got.keys() == before.keys()
    for name, h in got.items():
        if name in overrides:
            array = overrides[name].numpy()
            want = hashlib.sha256(f"1:{array.shape}:".encode())
            want.update(np.ascontiguousarray(array).tobytes())
            assert h == want.hexdigest(), name
        else:
            assert h == before[name], name


def test_adopted_weights_come_from_the_file_and_give_the_same_outputs(demo_dir, tmp_path):
    from craft_export.exporter import ExportOptions, load_everything
    from craft_export.model_build import ExportWeights, _Baked
    from craft_export.network_specs import network_specs
    from craft_export.onnx_export import example_inputs, export_onnx

    loaded = load_everything(ExportOptions(recipe=demo_dir / "recipe-sd15.toml", out=tmp_path / "unused"))
    net = _Baked(loaded.nets.text_encoders[0], {}).eval()
    spec = network_specs("sd15", loaded.parts, max_batch=2)["text_encoder"]
    x = example_inputs(spec, batch=2, seed=3)
    with torch.no_grad():
        before = net(**x)[0].clone()
    path = tmp_path / "te" / "model.onnx"
    export_onnx(net, spec, x, path)
    weights = ExportWeights()
    moved = weights.adopt(loaded.nets.text_encoders[0], path)
    params = dict(loaded.nets.text_encoders[0].named_parameters())
    assert moved > 0.9 * sum(p.nbytes for p in params.values())
    with torch.no_grad():
        weights.release()  # pages dropped: read back from the file
        after = net(**x)[0]
    assert torch.equal(before, after)
    data_file = str(path.with_name("model.onnx.data"))
    spans = [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in open("/proc/self/maps")
             if line.rstrip().endswith(data_file)]
    big = max(params.values(), key=lambda p: p.nbytes)
    assert any(lo <= big.data_ptr() < hi for lo, hi in spans)  # the parameter lives in the file's mapping


def _resettable() -> bool:
    from craft_export.memory import PhasePeaks

    return PhasePeaks().resettable


@pytest.mark.skipif(not _resettable(), reason="needs Linux /proc/self/clear_refs (VmHWM reset)")
def test_phase_peaks_give_each_phase_its_own_peak():
    from craft_export.memory import phase, track_phases

    size = 192 * 2**20
    with track_phases() as peaks:
        with phase("outer"):
            with phase("big"):
                block = np.ones(size, dtype=np.uint8)  # touched: resident
                del block
            with phase("small"):
                np.zeros(1024).sum()
        with phase("after"):
            pass
    p = peaks.summary()["phases"]
    assert list(p) == ["other", "outer", "outer/big", "outer/small", "after"]  # in the order first seen
    assert p["outer/big"] >= p["outer/small"] + size * 0.9  # the freed block is not the small phase's
    assert p["outer"] >= p["outer/big"]  # a nested phase's peak counts for the enclosing one
    assert peaks.peak == max(p.values())
    with track_phases(False) as none:
        assert none is None


@pytest.mark.extended  # 10-45 s; `make test` stays near 10 min, .ci/run runs it (make test-extended)
def test_export_reports_peak_memory_per_phase(demo_dir, tmp_path):
    """A tiny export with ``memory_phases``: every model's phases are in the report."""
    from craft_export.exporter import ExportOptions, export_repository
    from craft_reference.demo import recipe_text

    recipe = tmp_path / "recipe.toml"  # one content + one style LoRA: 6 models, every kind of phase
    recipe.write_text(recipe_text("sd15", ["dog", "watercolor"], demo_dir))
    report = export_repository(ExportOptions(recipe=recipe, out=tmp_path / "repo", runner="python",
                                             memory_phases=True))
    if not _resettable():
        pytest.skip("no VmHWM reset here: the phases are peaks so far")
    phases = report.memory["phases"]
    assert report.summary()["memory"] == report.memory
    assert report.memory["peak_bytes"] == max(phases.values()) > 0
    for step in ("trace", "save", "adopt", "parity_torch", "parity_ort"):
        for model in ("text_encoder", "vae_decoder", "unet_base"):
            assert phases[f"{model}/{step}"] > 0, (model, step)
    variants = [n for n in report.built if n.startswith("unet_") and n != "unet_base"]
    assert variants
    for name in variants:
        for step in ("bake", "derive", "parity_torch", "parity_ort"):
            assert phases[f"{name}/{step}"] > 0, (name, step)
    assert "load" in phases and "pipeline" in phases


def test_adopting_the_unet_points_the_baker_at_the_file(demo_dir, tmp_path):
    from craft_export.exporter import ExportOptions, load_everything
    from craft_export.model_build import ExportWeights, adopt_weights, network_module
    from craft_export.network_specs import network_specs
    from craft_export.onnx_export import example_inputs, export_onnx
    from craft_export.options import ModelJob

    loaded = load_everything(ExportOptions(recipe=demo_dir / "recipe-sd15.toml", out=tmp_path / "unused"))
    variant = Variant("dog", 0.7, "watercolor", 1.0)
    job = ModelJob("v", "unet", "k", (variant,))
    before = {k: v.clone() for k, v in network_module(loaded.nets, loaded.baker, job)[1].items()}
    spec = network_specs("sd15", loaded.parts, max_batch=2)["unet"]
    path = tmp_path / "base" / "model.onnx"
    export_onnx(loaded.nets.unet, spec, example_inputs(spec, hw=(64, 64), batch=2), path)
    weights = ExportWeights()
    adopt_weights(ModelJob("unet_base", "unet", "k", (Variant(),)), loaded.nets, loaded.baker,
                  path, weights)
    modules = dict(loaded.nets.unet.unet.named_modules())
    assert loaded.baker.W_init
    for name, w in loaded.baker.W_init.items():  # the module's own tensors: nothing else holds the loaded copy
        assert w.data_ptr() == modules[name].weight.data_ptr(), name
    weights.release()
    after = network_module(loaded.nets, loaded.baker, job)[1]
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name
