"""Training: Rank-FT backbone (Eq. 1-4) and routed content/style LoRAs (Eq. 6-7) on tiny models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from craft_export.loading import load_lora, load_pipeline_parts, load_unet, unet_module_shapes, unet_weights
from craft_export.recipe import load_recipe
from craft_export.recipe_models import LoadedLora
from craft_ops.rankft import merged_basis, rank_schedule
from craft_ops.request import GenerateRequest
from craft_ops.routing import PRESETS
from craft_reference.pipeline import ReferencePipeline
from craft_training.backbone import train_backbone
from craft_training.config import BackboneConfig, TrainError
from craft_training.rankft_bases import RankFTBases, frequency_split, layer_specs, target_layers
from craft_training.lora import LoraTrainConfig, train_lora

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest


def _write_images(folder: Path, n: int, *, striped: bool, seed: int) -> Path:
    """Small PNG/JPEG files of mixed aspect ratios: smooth fields (content) or stripes (style)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = 72 + 8 * k, 96
        y, x = np.mgrid[0:h, 0:w] / 24.0
        if striped:
            img = (np.sin(x * 9 + k) > 0)[..., None] * rng.uniform(0.3, 1.0, (h, w, 3))
        else:
            img = np.stack([np.sin(x + k), np.cos(y + 2 * k), np.sin(x * y / 4)], -1) * 0.4 + 0.5
        suffix = ".jpg" if k % 2 else ".png"
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img{k}{suffix}")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {"content": _write_images(root / "content", 3, striped=False, seed=0),
            "style": _write_images(root / "style", 2, striped=True, seed=1)}


def _config(base: Path, images: dict[str, Path], out: Path, **kw) -> BackboneConfig:
    kw = {"r_max": 4, "r_min": 2, "resolution": 64, "lr": 0.05, "steps": STEPS, "checkpoint_every": 4,
          "seed": 3, **kw}
    return BackboneConfig(base=base, content_images=images["content"], style_images=images["style"], out=out, **kw)


@pytest.fixture(scope="module")
def backbone(demo_dir, images, tmp_path_factory):
    config = _config(demo_dir / "sd15-tiny", images, tmp_path_factory.mktemp("w_init"))
    return config, train_backbone(config)


# -- Rank-FT pieces -------------------------------------------------------------------------------


@pytest.mark.extended  # 10-45 s; `make test` stays near 10 min, .ci/run runs it (make test-extended)
def test_preserve_objective_moves_w_init_less_than_denoise(demo_dir, images, tmp_path):
    """``preserve`` learns bases whose removal changes the prediction least; start and end are its own loss."""
    base = demo_dir / "sd15-tiny"
    runs = {obj: train_backbone(_config(base, images, tmp_path / obj, objective=obj, steps=6, lr=0.01, checkpoint_every=0))
            for obj in ("denoise", "preserve")}
    log = json.loads((tmp_path / "preserve" / "train_log.json").read_text())
    assert log["eval"]["base_W0"]["total"] == 0.0  # W0 against itself
    assert 0.0 < runs["preserve"].eval_end < runs["preserve"].eval_start

    def change(obj: str) -> float:  # how far W_init moved from W0, summed over the projected layers
        w0, w_init = unet_weights(load_unet(base)), unet_weights(load_unet(tmp_path / obj))
        return sum(float((w_init[k] - w0[k]).norm()) for k in w0)

    assert change("preserve") < change("denoise")


def test_frequency_split_is_a_gaussian_low_pass_and_its_residual():
    flat = torch.full((1, 3, 16, 16), 0.3)
    low, high = frequency_split(flat, 0.35)
    assert torch.allclose(low, flat, atol=1e-5) and high.abs().max() < 1e-5
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    low, high = frequency_split(x, 0.35)
    assert torch.allclose(low + high, x, atol=1e-6)
    checker = (torch.arange(16)[:, None] + torch.arange(24)[None, :]) % 2 * 2.0 - 1.0  # Nyquist pattern
    low_n, _ = frequency_split(checker.expand(1, 1, 16, 24), 0.35)
    assert low_n[..., 4:-4, 4:-4].abs().max() < 0.05  # Nyquist is removed from the content band
    assert low.var() < x.var()


def test_layers_follow_forward_order_and_eq2_ranks(demo_dir):
    unet = load_unet(demo_dir / "sd15-tiny")
    names = target_layers(unet)
    modules = dict(unet.named_modules())
    called: list[str] = []
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: called.append(n)) for n in names]
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), encoder_hidden_states=torch.randn(1, 77, 32))
    for h in handles:
        h.remove()
    assert called == names
    specs = layer_specs(unet, r_max=40, r_min=4)
    expected = rank_schedule(len(names), 40, 4)
    assert [s.r for s in specs] == [min(r, s.d_in) for r, s in zip(expected, specs)]
    assert specs[0].r == specs[0].d_in and specs[-1].r == 4  # capped at d_in at the shallow end


def test_backbone_training_lowers_the_loss_and_keeps_q_orthonormal(backbone, demo_dir):
    config, result = backbone
    out = config.out
    log = json.loads((out / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == list(range(1, STEPS + 1))
    assert log["eval"]["end"]["total"] < log["eval"]["start"]["total"]  # fixed noise and timesteps
    assert result.eval_end < result.eval_start
    layers = layer_specs(load_unet(demo_dir / "sd15-tiny"), config.r_max, config.r_min)
    init = RankFTBases(layers, torch.Generator("cpu").manual_seed(config.seed)).q_state()
    bases = load_file(str(out / "bases.safetensors"))
    assert set(bases) == set(init)
    assert sum(not torch.allclose(bases[k], init[k], atol=1e-4) for k in bases) > len(bases) // 2
    for key, Q in bases.items():
        assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[1]), atol=1e-5), key
    assert {"bases.safetensors", "optimizer.pt", "rng.pt", "state.json"} <= {
        p.name for p in (out / "checkpoint").iterdir()}


def test_w_init_changes_only_targeted_layers_inside_the_learned_subspace(backbone, demo_dir):
    config, _ = backbone
    W0 = dict(load_unet(demo_dir / "sd15-tiny").state_dict())
    W_init = dict(load_unet(config.out).state_dict())  # OUT/unet via the backbone loader
    bases = load_file(str(config.out / "bases.safetensors"))
    targets = set(target_layers(load_unet(config.out)))
    assert W0.keys() == W_init.keys()
    for key in W0:
        module = key.rsplit(".", 1)[0]
        if module not in targets or not key.endswith("weight"):
            assert torch.equal(W0[key], W_init[key]), key
            continue
        Q = merged_basis(bases[f"Q_c.{module}"], bases[f"Q_s.{module}"])
        diff = W_init[key] - W0[key]  # (d_out, d_in)
        assert torch.allclose(diff, -W0[key] @ Q @ Q.T, atol=1e-5), key
        v = torch.randn(diff.shape[1], 5, generator=torch.Generator().manual_seed(1))
        v_perp = v - Q @ (Q.T @ v)  # orthogonal to span(Q) on the input side
        assert (diff @ v_perp).abs().max() < 1e-5, key
        assert diff.abs().max() > 0, key


def test_resume_continues_bit_identically(backbone, demo_dir, images, tmp_path):
    config, _ = backbone
    first = _config(demo_dir / "sd15-tiny", images, tmp_path, steps=5)
    train_backbone(first)
    resumed = _config(demo_dir / "sd15-tiny", images, tmp_path, steps=STEPS, resume=True)
    train_backbone(resumed)
    for name in ("bases.safetensors", "checkpoint/bases.safetensors"):
        a, b = load_file(str(config.out / name)), load_file(str(tmp_path / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    log_a = json.loads((config.out / "train_log.json").read_text())
    log_b = json.loads((tmp_path / "train_log.json").read_text())
    assert log_a["steps"] == log_b["steps"]
    with pytest.raises(TrainError, match="other settings"):
        train_backbone(_config(demo_dir / "sd15-tiny", images, tmp_path, steps=STEPS + 1, lr=0.01, resume=True))


# -- LoRAs ---------------------------------------------------------------------------------------------


def _lora(base: Path, images: Path, out: Path, kind: str, prompt: str, backbone: Path | None = None):
    config = LoraTrainConfig(base=base, backbone=backbone, images=images, kind=kind, prompt=prompt, out=out,
                             rank=4, steps=4, lr=1e-2, resolution=64, seed=5)
    return train_lora(config)


def _check_routed(path: Path, kind: str, arch: str, shapes) -> object:
    tensors = load_file(str(path))
    routing = PRESETS[arch]
    modules = {k[len("unet."):].rsplit(".lora_", 1)[0] for k in tensors}
    assert modules and all(routing.layer_set(m) == kind for m in modules)
    assert any(tensors[f"unet.{m}.lora_B.weight"].abs().max() > 0 for m in modules)
    adapter, metadata = load_lora(path, shapes, name=path.stem)
    assert metadata["craft.kind"] == kind and metadata["craft.arch"] == arch
    assert metadata["craft.routing"] == arch and metadata["craft.rank"] == "4"
    assert json.loads(metadata["lora_adapter_metadata"]) == {"unet.r": 4, "unet.lora_alpha": 4.0, "unet.target_modules": sorted(modules)}
    assert set(adapter.modules) == modules and adapter.rank == 4
    return adapter


def test_routed_loras_on_w_init_load_and_generate(backbone, demo_dir, images, tmp_path):
    config, _ = backbone
    base = demo_dir / "sd15-tiny"
    dog = _lora(base, images["content"], tmp_path / "dog.safetensors", "content", "a sks dog <c>", config.out)
    ink = _lora(base, images["style"], tmp_path / "ink.safetensors", "style", "in sks style <s>", config.out)
    assert dog.losses and ink.losses
    parts = load_pipeline_parts(base, backbone=config.out)
    shapes = unet_module_shapes(parts.unet)
    loras = [LoadedLora("dog", "content", _check_routed(dog.out, "content", "sd15", shapes)),
             LoadedLora("ink", "style", _check_routed(ink.out, "style", "sd15", shapes))]
    pipe = ReferencePipeline(parts, PRESETS["sd15"], loras)
    image = pipe.generate(GenerateRequest(prompts=("a sks dog <c>",), content="dog", steps=2, height=64, width=64))
    plain = pipe.generate(GenerateRequest(prompts=("a sks dog",), steps=2, height=64, width=64))
    assert image.shape == (1, 64, 64, 3) and not np.array_equal(image, plain)  # the trained delta is live
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'[base]\npath = "{base}"\nbackbone = "{config.out}"\nrouting = "sd15"\n\n'
        f'[[lora]]\nname = "dog"\nkind = "content"\npath = "{dog.out}"\n\n'
        f'[[lora]]\nname = "ink"\nkind = "style"\npath = "{ink.out}"\n\n'
        "[defaults]\nsteps = 2\nheight = 64\nwidth = 64\n"
    )
    from_recipe = ReferencePipeline.from_recipe(load_recipe(recipe))
    W_init = load_unet(config.out).state_dict()
    assert all(torch.equal(v, W_init[k]) for k, v in from_recipe.parts.unet.state_dict().items())
    both = from_recipe.generate(GenerateRequest(prompts=("a sks dog <c> in sks style <s>",), content="dog",
                                                style="ink", steps=2))
    assert both.shape == (1, 64, 64, 3)


def test_sdxl_backbone_and_lora(demo_dir, images, tmp_path):
    base = demo_dir / "sdxl-tiny"
    result = train_backbone(_config(base, images, tmp_path / "w", steps=2, evaluate=False))
    assert (result.out / "unet" / "config.json").is_file()
    lora = _lora(base, images["content"], tmp_path / "dog.safetensors", "content", "a sks dog <c>", result.out)
    parts = load_pipeline_parts(base, backbone=result.out)
    adapter = _check_routed(lora.out, "content", "sdxl", unet_module_shapes(parts.unet))
    pipe = ReferencePipeline(parts, PRESETS["sdxl"], [LoadedLora("dog", "content", adapter)])
    image = pipe.generate(GenerateRequest(prompts=("a sks dog <c>",), content="dog", steps=2, height=64, width=64))
    assert image.shape == (1, 64, 64, 3)


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    ({"r_max": 0}, "--r-max must be positive"),
    ({"r_min": -1}, "--r-min must be positive"),
    ({"r_min": 8, "r_max": 4}, r"--r-min \(8\) must not exceed --r-max \(4\)"),
    ({"resolution": 60}, "--resolution must be a multiple of 8"),
    ({"sigma": 0.0}, "--sigma must be positive"),
    ({"objective": "sharpen"}, r"--objective must be one of \['denoise', 'preserve'\], got 'sharpen'"),
])
def test_bad_backbone_settings_are_refused(change, match, tmp_path):
    with pytest.raises(TrainError, match=match):
        BackboneConfig(base=tmp_path, content_images=tmp_path, style_images=tmp_path, out=tmp_path,
                       **{"r_max": 4, "r_min": 2, **change})


def test_bad_image_folders_name_the_path(demo_dir, images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(TrainError, match=r"--content-images: no PNG/JPEG images in .*empty"):
        train_backbone(_config(demo_dir / "sd15-tiny", {**images, "content": empty}, tmp_path / "o"))
    broken = _write_images(tmp_path / "broken", 1, striped=True, seed=0)
    (broken / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(TrainError, match=r"cannot read image .*bad\.png"):
        train_backbone(_config(demo_dir / "sd15-tiny", {**images, "style": broken}, tmp_path / "o"))
    with pytest.raises(TrainError, match="--images: no PNG/JPEG images"):
        _lora(demo_dir / "sd15-tiny", empty, tmp_path / "x.safetensors", "content", "a dog <c>")
    with pytest.raises(TrainError, match="--rank must be positive"):
        LoraTrainConfig(base=tmp_path, images=tmp_path, kind="style", prompt="x <s>", out=tmp_path / "x.safetensors",
                        rank=0)


def test_cli_reports_bad_input_without_traceback(tmp_path):
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "craft"), "train-backbone", "--base", str(tmp_path), "--content-images",
         str(tmp_path), "--style-images", str(tmp_path), "--out", str(tmp_path / "o"), "--r-max", "4", "--r-min", "8"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "craft: error: --r-min (8) must not exceed --r-max (4)" in proc.stderr
    assert "Traceback" not in proc.stderr
