"""Runtime-LoRA UNet (issue 14): factors and gates as network inputs == baked variants.

Parity: for every gate combination the time-gated ACFG loop produces (content only, content +
style, style only, W_init for the unconditional branch and for steps with both gates off) and
for continuous gates, with LoRAs of ranks 2, 4 and 8 in ONE batch (max rank 8), the runtime
network's output row of each sample equals the baked variant's output for that sample, on the
tiny SD 1.5 (1x1-conv proj_in / proj_out) and SDXL (linear projections) UNets. The demo LoRAs
also carry 3x3 resnet-conv factors, so the im2col branch is covered too.

Tolerance: fp32 on CPU. ``W x + s B (A x)`` and ``(W + s B A) x`` differ only in summation
order; the measured max |runtime - baked| (PyTorch) is 4.4e-6 (SD 1.5) and 3.2e-6 (SDXL) on
outputs up to ~2.6 in magnitude. Held to 1e-4 (the same bound as ONNX-vs-PyTorch parity).
"""

from __future__ import annotations

import pytest
import torch

from craft_export.runtime_network import RuntimeUNetNet, make_banks, runtime_spec
from craft_ops.aggregate import BASE, Variant
from craft_ops.lora import parse_lora
from craft_ops.routing import PRESETS
from craft_ops.runtime_lora import (ConvGeometry, RuntimeLayout, RuntimeLoraError, lora_branch, runtime_factors,
                                    runtime_layout)

TOL = 1e-4
MAX_RANK = 8
# name -> (kind, rank): three ranks in one batch, all <= MAX_RANK
LORAS = {"c2": ("content", 2), "c8": ("content", 8), "s4": ("style", 4), "s2": ("style", 2)}
# One batch: what the loop's steps ask for (cond branch at early / overlap / late steps, the
# unconditional branch) plus continuous gates. Each row: (content, gamma_c, style, gamma_s).
ROWS = [("c2", 1.0, None, 0.0), ("c8", 1.0, "s4", 1.0), (None, 0.0, "s4", 1.0), (None, 0.0, None, 0.0),
        ("c8", 0.3, "s2", 0.7), ("c2", 1.0, "s2", 1.0)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    """arch -> dict(parts, spec, runtime net, adapters, layout, baker)."""
    from craft_export.bake import VariantBaker
    from craft_export.loading import load_pipeline_parts, unet_module_shapes, unet_weights
    from craft_export.network_specs import network_specs
    from craft_export.networks import UNetNet
    from craft_export.recipe_models import LoadedLora
    from craft_reference.demo import lora_target_modules, make_lora_state_dict
    from craft_reference.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("rt_tiny")
    out = {}
    for arch in ("sd15", "sdxl"):
        parts = load_pipeline_parts(build_tiny_pipeline(arch, root / arch, seed=0))
        shapes = unet_module_shapes(parts.unet)
        routing = PRESETS[arch]
        modules = lora_target_modules(shapes)
        adapters = {}
        for k, (name, (kind, rank)) in enumerate(LORAS.items()):
            sd = make_lora_state_dict(shapes, modules, rank=rank, alpha=rank / 2, seed=100 + k, fmt="kohya")
            adapters[name] = parse_lora(sd, shapes, name=name)
        layout = runtime_layout(shapes, routing, max_rank=MAX_RANK)
        unet_net = UNetNet(parts.unet).eval()
        spec = runtime_spec(network_specs(arch, parts)["unet"], layout)
        loaded = [LoadedLora(n, LORAS[n][0], a) for n, a in adapters.items()]
        out[arch] = dict(parts=parts, shapes=shapes, routing=routing, adapters=adapters, layout=layout,
                         unet=unet_net, spec=spec, net=RuntimeUNetNet(unet_net, spec).eval(),
                         baker=VariantBaker(unet_weights(parts.unet), shapes, routing, loaded))
    return out


def _unet_inputs(t, batch, seed=3):
    from craft_export.network_specs import network_specs
    from craft_export.onnx_export import example_inputs

    return example_inputs(network_specs(t["spec"].arch, t["parts"])["unet"], hw=(64, 96), batch=batch, seed=seed)


def _runtime_inputs(t, rows, base_inputs):
    """Banks with one slot per LoRA (slot 0: none) and the rows' indices and scales."""
    names = list(LORAS)
    slots = {i + 1: runtime_factors(t["adapters"][n], LORAS[n][0], t["routing"], t["layout"])
             for i, n in enumerate(names)}
    inputs = dict(base_inputs)
    inputs.update(make_banks(t["layout"], slots, len(names) + 1))
    slot = lambda n: 0 if n is None else names.index(n) + 1  # noqa: E731
    inputs["content_index"] = torch.tensor([slot(r[0]) for r in rows], dtype=torch.int64)
    inputs["content_scale"] = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    inputs["style_index"] = torch.tensor([slot(r[2]) for r in rows], dtype=torch.int64)
    inputs["style_scale"] = torch.tensor([r[3] for r in rows], dtype=torch.float32)
    return inputs


def _baked_rows(t, rows, base_inputs):
    """Each row through its baked variant (Eq. 8 weights, functional_call), batch 1."""
    outs = []
    with torch.no_grad():
        for b, (c, gc, s, gs) in enumerate(rows):
            params = t["baker"].params_for(Variant(c, gc, s, gs), cache=False)
            one = {k: v[b:b + 1] for k, v in base_inputs.items()}
            outs.append(torch.func.functional_call(t["unet"], params, (), one, strict=False))
    return torch.cat(outs)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_runtime_equals_baked_pytorch(tiny, arch):
    t = tiny[arch]
    base = _unet_inputs(t, len(ROWS))
    with torch.no_grad():
        got = t["net"](**_runtime_inputs(t, ROWS, base))
    want = _baked_rows(t, ROWS, base)
    err = (got - want).abs().amax(dim=(1, 2, 3))
    assert float(err.max()) < TOL, f"per-row max |runtime - baked|: {err.tolist()}"
    # the LoRAs matter (the test would pass vacuously otherwise): every LoRA row differs from W_init
    w_init = _baked_rows(t, [(None, 0.0, None, 0.0)] * len(ROWS), base)
    moved = (want - w_init).abs().amax(dim=(1, 2, 3))
    for row, m in zip(ROWS, moved.tolist()):
        assert (m > 1e-3) == (row[1] > 0 or row[3] > 0), (row, m)


# SD 1.5's runtime graph is also exported, checked and compared with baked outputs by test_runtime_export
# (craft export --lora-mode runtime) in the default suite.
@pytest.mark.extended  # ~15 s per architecture; the default suite exports SD 1.5's through craft export
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_runtime_onnx_equals_baked(tiny, arch, tmp_path):
    """Exported at batch 2 / 3 slots / 64x64; run at batch 6 / 5 slots / 64x96 in ONNX Runtime."""
    from craft_export.onnx_export import export_onnx
    from craft_export.ort import OrtSession

    t = tiny[arch]
    example = _runtime_inputs(t, ROWS[:2], _unet_inputs(t, 2, seed=5))
    keep = {n: example[n] for n in example if not n.startswith("lora_")}
    for i in range(len(t["layout"].modules)):  # 3 slots at export (slot count is a dynamic axis)
        keep[f"lora_A.{i}"], keep[f"lora_B.{i}"] = example[f"lora_A.{i}"][:3], example[f"lora_B.{i}"][:3]
    keep["content_index"] = keep["content_index"].clamp(max=2)
    keep["style_index"] = keep["style_index"].clamp(max=2)
    path = tmp_path / "model.onnx"
    export_onnx(t["net"], t["spec"], keep, path)
    base = _unet_inputs(t, len(ROWS))
    inputs = _runtime_inputs(t, ROWS, base)
    got = OrtSession(path, threads=1).run_torch(inputs)["noise_pred"]
    want = _baked_rows(t, ROWS, base)
    assert float((got - want).abs().max()) < TOL


@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 1)])
def test_conv_branch_is_conv_with_delta(stride, padding, kernel):
    """The im2col branch == conv2d with the per-sample delta weight s * (B @ A) (CRAFT-LoRA Eq. 8)."""
    g = torch.Generator().manual_seed(0)
    n, c, o, r, R = 3, 5, 6, 2, 4
    x = torch.randn(n, c, 9, 7, generator=g)
    A = torch.randn(n, r, c * kernel * kernel, generator=g)
    B = torch.randn(n, o, r, generator=g)
    A_bank = torch.zeros(n + 1, R, c * kernel * kernel)
    B_bank = torch.zeros(n + 1, o, R)
    A_bank[1:, :r], B_bank[1:, :, :r] = A, B
    scale = torch.tensor([1.0, 0.5, 0.0])
    out = torch.nn.functional.conv2d(x, torch.zeros(o, c, kernel, kernel), stride=stride, padding=padding)
    geom = ConvGeometry(c, (kernel, kernel), (stride, stride), (padding, padding))
    got = lora_branch(x, A_bank, B_bank, torch.arange(1, n + 1), scale.reshape(-1, 1, 1), geom, out)
    for b in range(n):
        w = (scale[b] * B[b] @ A[b]).reshape(o, c, kernel, kernel)
        want = torch.nn.functional.conv2d(x[b:b + 1], w, stride=stride, padding=padding)
        assert torch.allclose(got[b:b + 1], want, atol=1e-5)


def test_refusals_name_the_problem(tiny):
    t = tiny["sd15"]
    small = RuntimeLayout(t["layout"].modules, 4)
    with pytest.raises(RuntimeLoraError, match=r"'c8' has rank 8 .*max rank 4"):
        runtime_factors(t["adapters"]["c8"], "content", t["routing"], small)
    # a routed module outside the network's targets: refused, never dropped
    only_attn = runtime_layout(t["shapes"], t["routing"], max_rank=MAX_RANK, targets=("attn1.to_q",))
    with pytest.raises(RuntimeLoraError, match=r"'c2'.*no runtime branch"):
        runtime_factors(t["adapters"]["c2"], "content", t["routing"], only_attn)
    # a Tucker (lora_mid) module: baked-only
    from craft_reference.demo import make_lora_state_dict

    conv = next(m for m in t["shapes"] if m.endswith("resnets.0.conv1") and m.startswith("down_blocks"))
    sd = make_lora_state_dict(t["shapes"], [conv], rank=2, alpha=2, seed=1, fmt="kohya")
    key = "lora_unet_" + conv.replace(".", "_")
    sd[f"{key}.lora_mid.weight"] = torch.randn(2, 2, 3, 3)
    sd[f"{key}.lora_down.weight"] = sd[f"{key}.lora_down.weight"][:, :, :1, :1].contiguous()
    tucker = parse_lora(sd, t["shapes"], name="tuck")
    with pytest.raises(RuntimeLoraError, match=r"'tuck'.*Tucker"):
        runtime_factors(tucker, "content", t["routing"], t["layout"])
    # the layout survives JSON (it is stored beside the network)
    assert RuntimeLayout.from_json(t["layout"].to_json()) == t["layout"]


def test_uncond_scale_zero_is_w_init(tiny):
    """Scale 0 with real factors in the slots is exactly W_init (ACFG's unconditional branch, Eq. 10)."""
    t = tiny["sdxl"]
    rows = [("c8", 0.0, "s4", 0.0), (None, 0.0, None, 0.0)]
    base = _unet_inputs(t, 2)
    inputs = _runtime_inputs(t, rows, base)
    inputs["content_index"] = torch.tensor([2, 2])  # slots hold c8 / s4, gates 0
    inputs["style_index"] = torch.tensor([3, 3])
    with torch.no_grad():
        got = t["net"](**inputs)
        want = t["unet"](**base)
    assert torch.equal(got, want)
    assert BASE.is_base


def test_dense_graph_equals_compact(tiny):
    """The dense network (TensorRT's graph: every sample through every branch) == the compact one (ONNX
    Runtime's: active rows only), including a call where no sample has an active LoRA of a kind."""
    t = tiny["sd15"]
    dense = RuntimeUNetNet(t["unet"], t["spec"], compact=False).eval()
    base = _unet_inputs(t, len(ROWS))
    for rows in (ROWS, [(r[0], r[1], None, 0.0) for r in ROWS]):  # the second: style set off for all
        inputs = _runtime_inputs(t, rows, base)
        with torch.no_grad():
            got, want = t["net"](**inputs), dense(**inputs)
        assert float((got - want).abs().max()) < TOL
