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
