"""Adapters beyond plain LoRA (DoRA, LoHa, LoKr, full diff, Tucker LoCon) baked into a plain dW.

Each is checked against PEFT's own implementation where PEFT has one (PEFT builds the adapter,
its merged weight is the reference), and against an unfused forward where it has not.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from craft_export.loading import LoadError, load_lora, unet_module_shapes, unet_weights
from craft_ops.adapters import DoraFactors, LohaFactors, LokrFactors
from craft_ops.lora import LoraError, adapter_deltas, bake_adapter, parse_lora

peft = pytest.importorskip("peft")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(64, 96)
        self.conv3 = nn.Conv2d(32, 48, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 48, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        return x


TARGETS = ["lin", "conv3", "conv1"]


def _peft_model(config):
    base = Small()
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("hada_", "lokr_", "lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.copy_(p * (0.5 + torch.rand(p.shape, generator=g)))
    state = peft.get_peft_model_state_dict(model)
    merged = model.merge_and_unload()
    merged = {m: getattr(merged, m).weight.detach() for m in TARGETS}
    for m in TARGETS:  # the adapter really moves every weight
        assert (merged[m] - getattr(base, m).weight).abs().max() > 0.05
    return base, state, merged


def _kohya(state, alpha):
    """PEFT LyCORIS tensor names under kohya / LyCORIS keys (``lora_unet_<module>.<tensor>``)."""
    out = {}
    for key, t in state.items():
        module, tensor = key.removeprefix("base_model.model.").split(".", 1)
        out[f"lora_unet_{module}.{tensor}"] = t
    for module in TARGETS:
        out[f"lora_unet_{module}.alpha"] = torch.tensor(float(alpha))
    return out


def _baked(adapter, base):
    shapes = {m: tuple(getattr(base, m).weight.shape) for m in TARGETS}
    weights = {m: getattr(base, m).weight.detach() for m in TARGETS}
    deltas = adapter_deltas(adapter, shapes, weights=weights)
    return {m: weights[m] + deltas[m] for m in TARGETS}


def _assert_merged(baked, merged):
    for m in TARGETS:
        assert torch.allclose(baked[m], merged[m], rtol=1e-5, atol=1e-6), (m, (baked[m] - merged[m]).abs().max())


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_equals_peft(tucker):
    config = peft.LoHaConfig(r=4, alpha=3, target_modules=TARGETS, use_effective_conv2d=tucker)
    base, state, merged = _peft_model(config)
    adapter = parse_lora(_kohya(state, 3), unet_module_shapes(base), name="loha")
    assert adapter.kinds == ("loha",)
    assert (adapter.modules["conv3"].t1 is not None) == tucker
    _assert_merged(_baked(adapter, base), merged)


@pytest.mark.parametrize("kw", [
    dict(r=2, decompose_both=True, use_effective_conv2d=True),  # w1_a/b, w2_a/b, Tucker t2 on the 3x3 conv
    dict(r=2, decompose_both=False, use_effective_conv2d=False),  # full w1, low-rank w2 (conv w2_b flattened)
    dict(r=2, decompose_factor=4),  # another factorisation of the dimensions
])
def test_lokr_equals_peft(kw):
    config = peft.LoKrConfig(alpha=3, target_modules=TARGETS, **kw)
    base, state, merged = _peft_model(config)
    adapter = parse_lora(_kohya(state, 3), unet_module_shapes(base), name="lokr")
    assert adapter.kinds == ("lokr",)
    assert all(not f.full_rank and f.scale == 1.5 for f in adapter.modules.values())
    _assert_merged(_baked(adapter, base), merged)


def test_lokr_full_factors_have_scale_one():
    """Both factors full: LyCORIS fixes scale 1 whatever the stored alpha; PEFT's alpha / r with alpha = r."""
    config = peft.LoKrConfig(r=64, alpha=64, target_modules=TARGETS)
    base, state, merged = _peft_model(config)
    adapter = parse_lora(_kohya(state, 5.0), unet_module_shapes(base), name="lokr-full")
    assert all(f.full_rank and f.scale == 1.0 for f in adapter.modules.values())
    _assert_merged(_baked(adapter, base), merged)


def test_dora_equals_peft_in_both_layouts():
    config = peft.LoraConfig(r=4, lora_alpha=3, target_modules=TARGETS, use_dora=True)
    base, state, merged = _peft_model(config)
    shapes = unet_module_shapes(base)
    from_peft = parse_lora(state, shapes, name="dora", alphas=3)
    kohya = {}
    for m in TARGETS:
        mag = state[f"base_model.model.{m}.lora_magnitude_vector"]
        shape = shapes[m]
        kohya[f"lora_unet_{m}.lora_down.weight"] = state[f"base_model.model.{m}.lora_A.weight"]
        kohya[f"lora_unet_{m}.lora_up.weight"] = state[f"base_model.model.{m}.lora_B.weight"]
        kohya[f"lora_unet_{m}.alpha"] = torch.tensor(3.0)
        kohya[f"lora_unet_{m}.dora_scale"] = mag.reshape(shape[0], *(1,) * (len(shape) - 1))  # LyCORIS wd_on_out
    from_kohya = parse_lora(kohya, shapes, name="dora-kohya")
    for adapter in (from_peft, from_kohya):
        assert adapter.kinds == ("dora",) and adapter.needs_base
        assert all(f.axis == "out" for f in adapter.modules.values())
        _assert_merged(_baked(adapter, base), merged)
        weights = {m: getattr(base, m).weight.detach() for m in TARGETS}
        baked = bake_adapter(adapter, weights)
        assert not baked.needs_base and baked.kinds == ("dora",)
        _assert_merged({m: weights[m] + d for m, d in adapter_deltas(baked, shapes).items()}, merged)
    with pytest.raises(LoraError, match="DoRA needs the base weight"):
        adapter_deltas(from_peft, shapes)


def test_dora_on_input_axis_and_on_loha():
    """LyCORIS ``wd_on_out=False`` (dora_scale (1, c_in, ...)): norm per input column; DoRA around LoHa."""
    base = Small()
    shapes = unet_module_shapes(base)
    g = torch.Generator().manual_seed(5)
    sd, expected = {}, {}
    for m in TARGETS:
        W = getattr(base, m).weight.detach()
        out, cin = W.shape[:2]
        a1, b1, a2, b2 = (torch.randn(out, 3, generator=g), torch.randn(3, W[0].numel(), generator=g),
                          torch.randn(out, 3, generator=g), torch.randn(3, W[0].numel(), generator=g))
        scale = torch.rand(1, cin, *(1,) * (W.ndim - 2), generator=g) + 0.5
        for k, v in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "dora_scale", "alpha"),
                        (a1, b1, a2, b2, scale, torch.tensor(6.0))):
            sd[f"lora_unet_{m}.{k}"] = v
        V = W + ((a1 @ b1) * (a2 @ b2) * 2.0).reshape(W.shape)  # alpha 6 / r 3
        norm = V.transpose(0, 1).reshape(cin, -1).norm(dim=1).reshape(1, cin, *(1,) * (W.ndim - 2))
        expected[m] = V * scale / norm  # LyCORIS apply_weight_decompose without its eps
    adapter = parse_lora(sd, shapes, name="dora-loha")
    assert all(isinstance(f, DoraFactors) and f.axis == "in" and isinstance(f.inner, LohaFactors)
               for f in adapter.modules.values())
    _assert_merged(_baked(adapter, base), expected)


def test_tucker_locon_equals_its_unfused_convolutions():
    """``lora_mid`` (LyCORIS LoCon with Tucker): down 1x1 -> mid 3x3 -> up 1x1, scaled by alpha / r."""
    conv = Small().conv3
    g = torch.Generator().manual_seed(2)
    down, mid, up = (torch.randn(4, 32, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g),
                     torch.randn(48, 4, 1, 1, generator=g))
    sd = {"lora_unet_conv3.lora_down.weight": down, "lora_unet_conv3.lora_mid.weight": mid,
          "lora_unet_conv3.lora_up.weight": up, "lora_unet_conv3.alpha": torch.tensor(2.0)}
    adapter = parse_lora(sd, {"conv3": tuple(conv.weight.shape)})
    delta = adapter_deltas(adapter, {"conv3": tuple(conv.weight.shape)})["conv3"]
    x = torch.randn(2, 32, 9, 9, generator=g)
    fused = F.conv2d(x, delta, padding=1)
    unfused = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * 0.5
    assert torch.allclose(fused, unfused, atol=1e-4)


def test_full_diff_and_bias_rules():
    base = Small()
    shapes = unet_module_shapes(base)
    diff = torch.randn(shapes["lin"])
    adapter = parse_lora({"lora_unet_lin.diff": diff, "lora_unet_lin.diff_b": torch.zeros(96)}, shapes)
    assert adapter.kinds == ("full",)
    assert torch.equal(adapter_deltas(adapter, shapes)["lin"], diff)
    with pytest.raises(LoraError, match="lin.*non-zero bias delta diff_b"):
        parse_lora({"lora_unet_lin.diff": diff, "lora_unet_lin.diff_b": torch.ones(96)}, shapes)
    with pytest.raises(LoraError, match="lin.*does not fit"):
        parse_lora({"lora_unet_lin.diff": torch.randn(96, 63)}, shapes)
    with pytest.raises(LoraError, match="conv3.*LoHa module lacks"):
        parse_lora({"lora_unet_conv3.hada_w1_a": torch.randn(48, 2)}, shapes)
    with pytest.raises(LoraError, match="conv3.*LoKr"):
        parse_lora({"lora_unet_conv3.lokr_w1": torch.randn(6, 4)}, shapes)
    with pytest.raises(LoraError, match="dora_scale"):
        parse_lora({"lora_unet_lin.lora_down.weight": torch.randn(2, 64), "lora_unet_lin.lora_up.weight":
                    torch.randn(96, 2), "lora_unet_lin.dora_scale": torch.ones(3, 1)}, shapes)
    with pytest.raises(LoraError, match="lin.*mixes LyCORIS"):
        parse_lora({"lora_unet_lin.diff": diff, "lora_unet_lin.lora_down.weight": torch.randn(2, 64)}, shapes)


def test_alpha_zero_means_rank_in_kohya_files():
    base = Small()
    shapes = unet_module_shapes(base)
    A, B = torch.randn(2, 64), torch.randn(96, 2)
    zero = parse_lora({"lora_unet_lin.lora_down.weight": A, "lora_unet_lin.lora_up.weight": B,
                       "lora_unet_lin.alpha": torch.tensor(0.0)}, shapes)
    assert zero.modules["lin"].scale == 1.0


def test_lycoris_file_on_the_tiny_unet(ref_pipes, tmp_path):
    """A kohya-layout file mixing DoRA, LoHa, LoKr, full and Tucker LoCon modules loads, bakes and
    changes the image; the DoRA modules need the base weights."""
    from craft_export.recipe_models import LoadedLora
    from craft_reference.pipeline import ReferencePipeline
    from craft_ops.request import GenerateRequest

    ref = ref_pipes["sd15"]
    unet = ref.parts.unet
    shapes = unet_module_shapes(unet)
    inside = sorted(ref.routing.select("content", shapes))
    linears = [m for m in inside if len(shapes[m]) == 2]
    convs = [m for m in inside if len(shapes[m]) == 4 and shapes[m][2] == 3]
    g = torch.Generator().manual_seed(9)
    sd = {}

    def key(m):
        return "lora_unet_" + m.replace(".", "_")

    for m in linears[0:3]:  # DoRA
        out, cin = shapes[m]
        sd[f"{key(m)}.lora_down.weight"] = torch.randn(2, cin, generator=g) * 0.2
        sd[f"{key(m)}.lora_up.weight"] = torch.randn(out, 2, generator=g) * 0.2
        sd[f"{key(m)}.dora_scale"] = torch.rand(out, 1, generator=g) + 0.5
    for m in linears[3:6]:  # LoHa
        out, cin = shapes[m]
        for k, s in (("hada_w1_a", (out, 2)), ("hada_w1_b", (2, cin)), ("hada_w2_a", (out, 2)), ("hada_w2_b", (2, cin))):
            sd[f"{key(m)}.{k}"] = torch.randn(s, generator=g) * 0.3
    for m in linears[6:9]:  # LoKr
        out, cin = shapes[m]
        sd[f"{key(m)}.lokr_w1"] = torch.randn(2, 2, generator=g) * 0.3
        sd[f"{key(m)}.lokr_w2_a"] = torch.randn(out // 2, 2, generator=g) * 0.3
        sd[f"{key(m)}.lokr_w2_b"] = torch.randn(2, cin // 2, generator=g) * 0.3
        sd[f"{key(m)}.alpha"] = torch.tensor(1.0)
    sd[f"{key(convs[0])}.diff"] = torch.randn(shapes[convs[0]], generator=g) * 0.05
    out, cin = shapes[convs[1]][:2]
    sd[f"{key(convs[1])}.lora_down.weight"] = torch.randn(2, cin, 1, 1, generator=g) * 0.3
    sd[f"{key(convs[1])}.lora_mid.weight"] = torch.randn(2, 2, 3, 3, generator=g) * 0.3
    sd[f"{key(convs[1])}.lora_up.weight"] = torch.randn(out, 2, 1, 1, generator=g) * 0.3
    path = tmp_path / "lycoris.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))

    with pytest.raises(LoadError, match="lycoris.safetensors.*DoRA.*base weights"):
        load_lora(path, shapes, name="mix")
    adapter, _ = load_lora(path, shapes, name="mix", weights=unet_weights(unet))
    assert adapter.kinds == ("dora", "full", "loha", "lokr", "lora") and not adapter.needs_base
    assert isinstance(adapter.modules[linears[6]], LokrFactors)
    pipe = ReferencePipeline(ref.parts, ref.routing, [LoadedLora("mix", "content", adapter)])
    req = dict(prompts=("a dog <c>",), steps=3, seed=2, height=64, width=64)
    with_lora = pipe.generate(GenerateRequest(content="mix", **req))
    without = pipe.generate(GenerateRequest(**{**req, "prompts": ("a dog",)}))
    assert np.abs(with_lora.astype(int) - without.astype(int)).mean() > 1.0
