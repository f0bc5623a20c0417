"""Checkpoints as users download them: variant-only diffusers folders and single-file ``.safetensors``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from craft_export.ldm_layout import clip_to_ldm, open_clip_to_ldm, unet_to_sgm, vae_to_ldm, write_single_file
from craft_export.loading import LoadError, load_pipeline_parts, weights_variant
from craft_export.recipe import RecipeError, load_recipe
from craft_reference.pipeline import ReferencePipeline
from craft_export.single_file import SingleFileError, write_config_folder
from craft_ops.request import GenerateRequest
from craft_ops.routing import resolve_routing

COMPONENTS = {"sd15": ["unet", "vae", "text_encoder"], "sdxl": ["unet", "vae", "text_encoder", "text_encoder_2"]}


def _image(parts, arch):
    pipe = ReferencePipeline(parts, resolve_routing(arch), [])
    return pipe.generate(GenerateRequest(prompts=("a photo of a dog",), seed=3, steps=3, height=64, width=64))


def _to_variant_only(src, dst, arch):
    """A copy of a folder holding only ``fp16`` variant weights, as SD 1.5 / SDXL are usually downloaded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    shutil.copytree(src, dst)
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    for name in COMPONENTS[arch]:
        model = classes[name].from_pretrained(src / name)
        for f in (dst / name).glob("*.safetensors"):
            f.unlink()
        model.to(torch.float16).save_pretrained(dst / name, variant="fp16")
    return dst


def test_variant_only_folder_loads(demo_dir, tmp_path):
    folder = _to_variant_only(demo_dir / "sd15-tiny", tmp_path / "sd15-fp16", "sd15")
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert (folder / "text_encoder" / "model.fp16.safetensors").is_file()
    assert weights_variant(folder / "unet") == "fp16"
    parts = load_pipeline_parts(folder)
    original = load_pipeline_parts(demo_dir / "sd15-tiny")
    for name in ("unet", "vae"):
        got, want = getattr(parts, name).state_dict(), getattr(original, name).state_dict()
        assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k].half().float()) for k in want)
    assert _image(parts, "sd15").shape == (1, 64, 64, 3)
    # the recipe may name the variant; a folder with two variants and no plain weights needs it
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(demo_dir / "sd15-tiny" / "unet").to(torch.bfloat16).save_pretrained(
        folder / "unet", variant="bf16")
    with pytest.raises(LoadError, match=r"several weight variants \['bf16', 'fp16'\].*base.variant"):
        load_pipeline_parts(folder)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[base]\npath = "{folder}"\nvariant = "bf16"\nrouting = "sd15"\n')
    parsed = load_recipe(recipe)
    assert parsed.variant == "bf16"
    unet = load_pipeline_parts(parsed.base, variant=parsed.variant).unet
    assert torch.equal(unet.conv_in.weight, original.unet.conv_in.weight.bfloat16().float())
    with pytest.raises(LoadError, match="no component has 'int8' weights"):
        load_pipeline_parts(folder, variant="int8")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_checkpoint_equals_its_folder(demo_dir, tmp_path, monkeypatch, arch):
    monkeypatch.setenv("CRAFT_CACHE_DIR", str(tmp_path / "cache"))
    folder = demo_dir / f"{arch}-tiny"
    single = write_single_file(folder, tmp_path / f"{arch}.safetensors")
    # the config folder a user keeps next to the checkpoint: configs and tokenizers, no weights
    config = tmp_path / "configs"
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors"))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[base]\npath = "{single.name}"\nconfig = "configs"\nrouting = "{arch}"\n')
    parsed = load_recipe(recipe)
    assert parsed.base == single and parsed.config == config
    parts = load_pipeline_parts(parsed.base, config=parsed.config)
    assert parts.arch == arch and parts.extra["single_file"] == str(single)
    assert (parts.path / "model_index.json").is_file() and parts.path.is_relative_to(tmp_path / "cache")
    original = load_pipeline_parts(folder)
    for name in ("unet", "vae"):
        got, want = getattr(parts, name).state_dict(), getattr(original, name).state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
    for got, want in zip(parts.text_encoders, original.text_encoders):
        assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
    assert np.array_equal(_image(parts, arch), _image(original, arch))
    # converted once: a second load reuses the cached folder
    assert load_pipeline_parts(single, config=config).path == parts.path


def test_single_file_refusals(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CRAFT_CACHE_DIR", str(tmp_path / "cache"))
    single = write_single_file(demo_dir / "sd15-tiny", tmp_path / "sd15.safetensors")
    with pytest.raises(LoadError, match="tokenizer/vocab.json.*base.config"):
        load_pipeline_parts(single)
    only_tokenizer = tmp_path / "tok"
    shutil.copytree(demo_dir / "sd15-tiny" / "tokenizer", only_tokenizer / "tokenizer")
    # the project's own SD 1.5 tables describe the full-size model, not this tiny one
    with pytest.raises(LoadError, match="sd15.safetensors: cannot convert with the configs"):
        load_pipeline_parts(single, config=only_tokenizer)
    with pytest.raises(LoadError, match="StableDiffusionXLPipeline folder, but the checkpoint is sd15"):
        load_pipeline_parts(single, config=demo_dir / "sdxl-tiny")
    torch.save({}, tmp_path / "model.ckpt")
    with pytest.raises(LoadError, match="pickled .ckpt"):
        load_pipeline_parts(tmp_path / "model.ckpt")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoadError, match="not a Stable Diffusion single-file checkpoint"):
        load_pipeline_parts(tmp_path / "other.safetensors", config=demo_dir / "sd15-tiny")
    cases = {
        f'path = "{tmp_path / "model.ckpt"}"': "pickle checkpoints are refused",
        f'path = "{tmp_path / "none.safetensors"}"': "single-file checkpoint not found",
        f'path = "{demo_dir / "sd15-tiny"}"\nconfig = "{demo_dir / "sd15-tiny"}"': "only a single-file base.path",
        f'path = "{demo_dir / "sd15-tiny"}"\nvariant = "f p"': "base.variant",
    }
    for body, needle in cases.items():
        recipe = tmp_path / "bad.toml"
        recipe.write_text(f"[base]\n{body}\n")
        with pytest.raises(RecipeError, match=needle):
            load_recipe(recipe)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_full_size_layout_converts_with_the_project_configs(demo_dir, tmp_path, arch):
    """The original-layout names of the full-size architectures (meta tensors, no weights) convert
    back through diffusers' own single-file conversion with the configs the project writes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizers = tmp_path / "tok"
    for name in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):
        shutil.copytree(demo_dir / "sdxl-tiny" / name, tokenizers / name)
    configs = write_config_folder(arch, tmp_path / "configs", tokenizers)
    index = json.loads((configs / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
        big = (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(configs / "text_encoder_2"))
               if arch == "sdxl" else None)
    assert unet.config.cross_attention_dim == (2048 if arch == "sdxl" else 768)

    def same(converted, model):
        want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        assert {k: tuple(v.shape) for k, v in converted.items()} == want

    same(convert_ldm_unet_checkpoint(unet_to_sgm(unet), unet.config), unet)
    same(convert_ldm_vae_checkpoint(vae_to_ldm(vae), vae.config), vae)
    prefix = "conditioner.embedders.0.transformer." if arch == "sdxl" else "cond_stage_model.transformer."
    converted = convert_ldm_clip_checkpoint(clip_to_ldm(clip, prefix))
    same({k.removeprefix("text_model.") if not hasattr(clip, "text_model") else k: v for k, v in converted.items()},
         clip)
    if big is not None:
        same(convert_open_clip_checkpoint(big, open_clip_to_ldm(big, "conditioner.embedders.1.model."),
                                          prefix="conditioner.embedders.1.model."), big)
