"""LoRA formats, baking vs unfused forward, and refusal of bad LoRA files."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from craft_export.loading import LoadError, load_lora, read_lora_file, unet_module_shapes
from craft_ops.aggregate import Variant
from craft_ops.lora import LoraError, adapter_deltas, detect_format, parse_lora
from craft_reference.demo import lora_target_modules, make_lora_state_dict


@pytest.fixture(scope="module")
def shapes(ref_pipes):
    return {arch: unet_module_shapes(p.parts.unet) for arch, p in ref_pipes.items()}


def _factors(shapes, modules, seed=0, rank=4):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        s = shapes[m]
        out[m] = (torch.randn((rank, *s[1:]), generator=g), torch.randn((s[0], rank, *(1,) * (len(s) - 2)), generator=g))
    return out


def _write(fmt, factors, alpha):
    sd = {}
    for m, (A, B) in factors.items():
        if fmt == "peft":
            sd[f"base_model.model.{m}.lora_A.weight"] = A
            sd[f"base_model.model.{m}.lora_B.weight"] = B
        elif fmt == "peft-unet":
            sd[f"unet.{m}.lora_A.default.weight"] = A
            sd[f"unet.{m}.lora_B.default.weight"] = B
        elif fmt == "kohya":
            k = "lora_unet_" + m.replace(".", "_")
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"], sd[f"{k}.alpha"] = A, B, torch.tensor(alpha)
        elif fmt == "legacy-compat":
            sd[f"unet.{m}.lora.down.weight"], sd[f"unet.{m}.lora.up.weight"] = A, B
        elif fmt == "legacy-processor":
            attn, proj = m.rsplit(".attn", 1)[0], m.split(".")[-1]
            head = m[: m.index(".to_")]
            proj = "to_out" if m.endswith("to_out.0") else m.split(".")[-1]
            sd[f"unet.{head}.processor.{proj}_lora.down.weight"] = A
            sd[f"unet.{head}.processor.{proj}_lora.up.weight"] = B
    return sd


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_all_formats_give_the_same_deltas(shapes, arch):
    s = shapes[arch]
    attn = [m for m in s if m.endswith(("attn1.to_q", "attn2.to_out.0"))][:4]
    convs = [m for m in s if m.endswith("conv1")][:2] + [m for m in s if m.endswith("conv_shortcut")][:1]
    factors = _factors(s, attn + convs)
    alpha = 2.0
    reference = None
    for fmt in ("peft", "peft-unet", "kohya", "legacy-compat"):
        adapter = parse_lora(_write(fmt, factors, alpha), s, name=fmt, alphas=alpha if "kohya" not in fmt else None)
        assert set(adapter.modules) == set(factors)
        deltas = adapter_deltas(adapter, s)
        if reference is None:
            reference = deltas
            m = attn[0]
            A, B = factors[m]
            assert torch.allclose(deltas[m], alpha / 4 * B @ A)
        for m in reference:
            assert torch.equal(deltas[m], reference[m]), (fmt, m)
    # attention-processor keys (linear attention projections only)
    proc = parse_lora(_write("legacy-processor", {m: factors[m] for m in attn}, alpha), s, alphas=alpha)
    assert detect_format(_write("legacy-processor", {m: factors[m] for m in attn}, alpha)) == "diffusers-legacy"
    for m in attn:
        assert torch.equal(adapter_deltas(proc, s)[m], reference[m])


def _unfused_hooks(unet, adapter, gamma, modules):
    """Forward hooks adding gamma * scale * B(A(x)) to each module's output: the unfused LoRA."""
    handles = []
    named = dict(unet.named_modules())
    for m in modules:
        f = adapter.modules[m]
        mod = named[m]

        def hook(module, inputs, output, f=f):
            x = inputs[0]
            if isinstance(module, torch.nn.Conv2d):
                h = F.conv2d(x, f.A, stride=module.stride, padding=module.padding)
                h = F.conv2d(h, f.B)
            else:
                h = x @ f.A.T @ f.B.T
            return output + gamma * f.scale * h

        handles.append(mod.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_baked_equals_unfused_lora(ref_pipes, arch):
    pipe = ref_pipes[arch]
    name_c, name_s = "dog", "watercolor"
    gamma_c, gamma_s = 1.0, 0.5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor(500.0)
    cond = pipe.encode(["a dog", "a cat"], 64, 64)
    from craft_ops.sampling import UNetCall

    baked = pipe.denoise([UNetCall(x, t, cond, Variant(name_c, gamma_c, name_s, gamma_s))])[0]
    unet = pipe.parts.unet
    handles = []
    for name, gamma in ((name_c, gamma_c), (name_s, gamma_s)):
        lora = pipe.loras[name]
        routed = pipe.routing.select(lora.kind, lora.adapter.modules)
        assert routed, "demo LoRA must touch its own layer set"
        handles += _unfused_hooks(unet, lora.adapter, gamma, routed)
    try:
        unfused = pipe.denoise([UNetCall(x, t, cond, Variant())])[0]
    finally:
        for h in handles:
            h.remove()
    plain = pipe.denoise([UNetCall(x, t, cond, Variant())])[0]
    assert (baked - unfused).abs().max() < 1e-4
    assert (baked - plain).abs().max() > 1e-2  # the LoRAs do change the output


def test_bad_lora_state_dicts(shapes):
    s = shapes["sd15"]
    m = next(k for k in s if k.endswith("attn1.to_q"))
    A, B = torch.randn(4, s[m][1]), torch.randn(s[m][0], 4)
    with pytest.raises(LoraError, match="does not fit"):
        parse_lora({f"unet.{m}.lora_A.weight": torch.randn(4, s[m][1] + 1), f"unet.{m}.lora_B.weight": B}, s)
    with pytest.raises(LoraError, match="rank mismatch"):
        parse_lora({f"unet.{m}.lora_A.weight": A, f"unet.{m}.lora_B.weight": torch.randn(s[m][0], 3)}, s)
    with pytest.raises(LoraError, match="not_a_module"):
        parse_lora({"unet.not_a_module.lora_A.weight": A, "unet.not_a_module.lora_B.weight": B}, s)
    with pytest.raises(LoraError, match="lora_unet_nowhere"):
        parse_lora({"lora_unet_nowhere.lora_down.weight": A, "lora_unet_nowhere.lora_up.weight": B}, s)
    with pytest.raises(LoraError, match="no up/B factor"):
        parse_lora({f"unet.{m}.lora_A.weight": A}, s)
    with pytest.raises(LoraError, match="text encoder"):
        parse_lora({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": A}, s)
    with pytest.raises(LoraError, match="unrecognised"):
        parse_lora({"model.diffusion_model.weight": A}, s)
    bad = parse_lora({f"unet.{m}.lora_A.weight": A, f"unet.{m}.lora_B.weight": B * float("inf")}, s, name="infy")
    with pytest.raises(LoraError, match="infy.*non-finite"):
        adapter_deltas(bad, s)


def test_bad_lora_files(tmp_path, shapes):
    s = shapes["sd15"]
    modules = lora_target_modules(s)[:3]
    good = make_lora_state_dict(s, modules, rank=2, alpha=2, seed=0, fmt="peft")
    # NaN weights
    nan = dict(good)
    key = next(iter(nan))
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(LoadError, match="NaN"):
        read_lora_file(tmp_path / "nan.safetensors")
    # pickles refused without being opened
    for suffix in (".ckpt", ".pt", ".bin"):
        torch.save(good, tmp_path / f"x{suffix}")
        with pytest.raises(LoadError, match="pickle"):
            read_lora_file(tmp_path / f"x{suffix}")
    # a pickle renamed to .safetensors is not a safetensors file
    torch.save(good, tmp_path / "renamed.safetensors")
    with pytest.raises(LoadError, match="not a readable safetensors"):
        read_lora_file(tmp_path / "renamed.safetensors")
    with pytest.raises(LoadError, match="not found"):
        read_lora_file(tmp_path / "missing.safetensors")
    # wrong shapes, with the file named
    wrong = {k: (torch.randn(v.shape[0], v.shape[1] + 1, *v.shape[2:]) if "lora_A" in k else v) for k, v in good.items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(LoadError, match="wrong.safetensors.*does not fit"):
        load_lora(tmp_path / "wrong.safetensors", s, name="wrong")
    save_file(good, str(tmp_path / "good.safetensors"), metadata={"alpha": "1.0"})
    adapter, _ = load_lora(tmp_path / "good.safetensors", s, name="good")
    assert math.isclose(adapter.modules[modules[0]].alpha, 1.0)


SGM_FACTS = {  # SGM / LDM block names of the public layouts -> diffusers module names
    "sdxl": {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_5_1_transformer_blocks_0_attn2_to_out_0": "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",
        "output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    },
    "sd15": {
        "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
        "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_11_1_transformer_blocks_0_ff_net_2": "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
    },
}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_kohya_sgm_names_map_to_diffusers_modules(shapes, arch):
    s = shapes[arch]
    facts = SGM_FACTS[arch]
    factors = _factors(s, list(facts.values()))
    sgm = {}
    for key, module in facts.items():
        A, B = factors[module]
        sgm[f"lora_unet_{key}.lora_down.weight"], sgm[f"lora_unet_{key}.lora_up.weight"] = A, B
        sgm[f"lora_unet_{key}.alpha"] = torch.tensor(2.0)
    by_sgm = parse_lora(sgm, s, name="sgm")
    by_diffusers = parse_lora(_write("kohya", factors, 2.0), s, name="diffusers")
    assert set(by_sgm.modules) == set(facts.values())
    for m in facts.values():
        assert torch.equal(adapter_deltas(by_sgm, s)[m], adapter_deltas(by_diffusers, s)[m])
