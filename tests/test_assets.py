"""Demo assets: the full-size architectures are the public ones; their recipes load with the documented ranges."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from craft_export.recipe import load_recipe
from craft_reference.demo import recipe_text
from craft_reference.tiny import FULL_CONFIGS, _text_encoder

# Parameter counts of the released checkpoints (UNet, VAE, text encoder(s)).
PUBLIC_PARAMETERS = {
    "sd15": (859_520_964, 83_653_863, [123_060_480]),
    "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_full_size_configs_have_the_public_parameter_counts(arch):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = FULL_CONFIGS[arch]
    with torch.device("meta"):  # shapes only
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"], scaling_factor=spec["scaling_factor"])
        encoders = [_text_encoder(t, spec["vocab_size"], 0, 1, 2) for t in spec["text_encoders"]]

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert (count(unet), count(vae), [count(e) for e in encoders]) == PUBLIC_PARAMETERS[arch]


@pytest.mark.parametrize("arch, px, steps, engine", [("sd15", 512, 50, (512, 512, 768)),
                                                      ("sdxl", 1024, 30, (768, 1024, 1024))])
def test_full_size_recipe_has_the_documented_resolution_range(tmp_path, arch, px, steps, engine):
    (tmp_path / f"{arch}-full").mkdir()
    (tmp_path / "loras").mkdir()
    for name in ("dog", "fire"):
        (tmp_path / "loras" / f"{arch}-full-{name}.safetensors").write_bytes(b"")  # only paths are read here
    recipe = tmp_path / f"recipe-{arch}-full.toml"
    recipe.write_text(recipe_text(arch, ["dog", "fire"], size="full"))
    loaded = load_recipe(recipe)
    assert loaded.base == (tmp_path / f"{arch}-full").resolve()
    assert [lora.path.name for lora in loaded.loras] == [f"{arch}-full-dog.safetensors", f"{arch}-full-fire.safetensors"]
    defaults = loaded.defaults(arch)
    assert (defaults.height, defaults.width, defaults.steps) == (px, px, steps)
    e = loaded.engine_range(arch)
    assert (e.min_size, e.opt_size, e.max_size, e.max_batch) == (*engine, 8)


@pytest.mark.parametrize("args, field", [(["--size", "huge"], "--size"), (["--arch", "sd3"], "sd3")])
def test_demo_assets_rejects_bad_flags(tmp_path, args, field):
    r = subprocess.run([sys.executable, "-m", "craft_cli", "demo-assets", "--out", str(tmp_path / "x"), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and field in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x" / "sd15-tiny").exists()
