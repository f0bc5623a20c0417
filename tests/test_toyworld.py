"""The toy world: deterministic renderer, tokenizer, judges and committed base that learned something."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from craft_cli.app import main as craft
from craft_ops.request import GenerateRequest
from craft_toyworld.catalog import ASSETS, committed_craft_loras, list_world, write_toy_demo_assets
from craft_toyworld.concepts import CONCEPTS, TOY_ROUTING, layer_routing
from craft_toyworld.judges import Judges, accuracy
from craft_toyworld.world import (
    BASE_SHAPES,
    BASE_STYLES,
    CAPTION_WORDS,
    HELD_OUT_SHAPES,
    HELD_OUT_STYLES,
    SHAPES,
    STYLES,
    WorldError,
    render,
    render_many,
    sample_scene,
)

HAVE_ASSETS = (ASSETS / "base" / "unet").is_dir() and (ASSETS / "judges.safetensors").is_file()
needs_assets = pytest.mark.skipif(not HAVE_ASSETS, reason="committed toy-world assets are missing")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest


# -- the world ------------------------------------------------------------------------------------


def test_world_has_enough_concepts_and_holds_some_out():
    assert len(SHAPES) >= 8 and len(STYLES) >= 8
    assert len(HELD_OUT_SHAPES) >= 2 and len(HELD_OUT_STYLES) >= 2
    assert not set(BASE_SHAPES) & set(HELD_OUT_SHAPES) and not set(BASE_STYLES) & set(HELD_OUT_STYLES)
    base_draws = {(s.shape, s.style) for s in (sample_scene(3, i) for i in range(400))}
    assert {sh for sh, _ in base_draws} == set(BASE_SHAPES) and {st for _, st in base_draws} == set(BASE_STYLES)


def test_renderer_is_deterministic_and_seeded():
    a, scenes_a = render_many("star", "checker", 4, seed=11)
    b, scenes_b = render_many("star", "checker", 4, seed=11)
    c, _ = render_many("star", "checker", 4, seed=12)
    assert a.shape == (4, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and scenes_a == scenes_b
    assert not np.array_equal(a, c)
    assert len({img.tobytes() for img in a}) == 4  # jittered: every image differs
    # an image is a pure function of its (seed, index): order does not matter
    assert np.array_equal(render(sample_scene(11, 2, shapes=("star",), styles=("checker",))), a[2])


def test_every_shape_and_style_renders_differently():
    scene = sample_scene(0, 0)
    from dataclasses import replace

    shapes = {render(replace(scene, shape=s)).tobytes() for s in SHAPES}
    styles = {render(replace(scene, style=t)).tobytes() for t in STYLES}
    assert len(shapes) == len(SHAPES) and len(styles) == len(STYLES)


def test_bad_names_are_refused_with_the_field(tmp_path, capsys):
    with pytest.raises(WorldError, match="shape: unknown shape 'blob'"):
        render_many("blob", None, 1, 0)
    with pytest.raises(WorldError, match="n: must be a positive integer"):
        render_many(None, None, 0, 0)
    assert craft(["toyworld", "render", "--style", "plaid", "--out", str(tmp_path)]) == 2
    assert "craft: error: style: unknown style 'plaid'" in capsys.readouterr().err
    assert craft(["toyworld", "judge", "--images", str(tmp_path / "none")]) == 2
    assert "craft: error: --images: folder not found" in capsys.readouterr().err
    assert craft(["toyworld", "train-loras", "--base", str(tmp_path), "--out", str(tmp_path / "s"), "--lr", "-1"]) == 2
    assert "craft: error: --lr: must be positive" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_caption_words_and_rare_tokens_are_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    from craft_toyworld.base import RARE_TOKENS, TEXT_CONFIG, write_tokenizer

    write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == TEXT_CONFIG["max_position_embeddings"]
    for word in (*CAPTION_WORDS, *RARE_TOKENS):
        assert len(tok(word).input_ids) == 3, word  # <start> word <end>


def test_all_layer_routing_covers_every_block_of_its_kind():
    from craft_ops.routing import resolve_routing

    r = resolve_routing(layer_routing("content", "all"))
    assert r.select("content", ["down_blocks.0.x", "mid_block.y", "up_blocks.2.z"]) == [
        "down_blocks.0.x", "mid_block.y", "up_blocks.2.z"]
    toy = resolve_routing(layer_routing("style", "routed"))
    assert toy.name == "toy"
    assert toy.layer_set("up_blocks.1.attentions.0.proj_in") == "content"
    assert toy.layer_set("up_blocks.2.resnets.0.conv1") == "style"


def test_demo_recipe_names_the_toy_routing(tmp_path):
    from craft_export.recipe import load_recipe

    recipe = load_recipe(write_toy_demo_assets(tmp_path))
    assert recipe.routing.content == tuple(TOY_ROUTING["content"])
    assert recipe.routing.style == tuple(TOY_ROUTING["style"])


def test_cli_render_writes_pngs_and_list_names_the_loras(tmp_path, capsys):
    assert craft(["toyworld", "render", "--shape", "heart", "--style", "gradient", "--n", "3", "--seed", "5",
                     "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 3 and all(f.name.startswith("heart-gradient-") for f in files)
    assert np.asarray(Image.open(files[0])).shape == (64, 64, 3)
    capsys.readouterr()
    assert craft(["toyworld", "list", "--json"]) == 0
    world = json.loads(capsys.readouterr().out)
    assert world["held_out_shapes"] == list(HELD_OUT_SHAPES) and world["held_out_styles"] == list(HELD_OUT_STYLES)
    assert {(l["name"], l["kind"], l["token"]) for l in world["loras"]} == {(c.name, c.kind, c.token) for c in CONCEPTS}
    assert world == list_world()


# -- committed assets -----------------------------------------------------------------------------


@needs_assets
def test_committed_assets_fit_the_size_budget():
    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    assert size(ASSETS / "base") <= 10 * 2**20
    assert size(ASSETS) <= 20 * 2**20


@needs_assets
def test_judges_are_accurate_on_fresh_renders():
    judges = Judges.load(ASSETS / "judges.safetensors")
    acc = accuracy(judges, seed=2024, n=300)  # a stream the judges never trained on
    assert acc["shape"] >= 0.98 and acc["style"] >= 0.98, acc


@needs_assets
def test_cli_judge_reads_a_folder(tmp_path, capsys):
    craft(["toyworld", "render", "--shape", "cross", "--style", "dots", "--n", "2", "--seed", "9", "--out", str(tmp_path)])
    capsys.readouterr()
    assert craft(["toyworld", "judge", "--images", str(tmp_path), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["shape"], r["style"]) for r in records] == [("cross", "dots")] * 2
    assert all(0.0 <= r["shape_prob"] <= 1.0 for r in records)


@needs_assets
def test_committed_base_draws_a_red_circle():
    """A real check that the base learned something: 20 steps of 'a red circle' look like circles."""
    from craft_toyworld.methods import build_pipeline

    pipe = build_pipeline(ASSETS / "base", None, {}, routed=True)
    images = pipe.generate(GenerateRequest(prompts=("a red circle",) * 8, seed=0, steps=20))
    verdict = Judges.load(ASSETS / "judges.safetensors")(images)
    shapes = [verdict.shape(i) for i in range(8)]
    assert shapes.count("circle") >= 6, shapes


@needs_assets
def test_demo_assets_recipe_generates_locally(tmp_path):
    from craft_reference.pipeline import ReferencePipeline

    recipe = write_toy_demo_assets(tmp_path)
    assert recipe == tmp_path / "recipe-toy.toml" and (tmp_path / "toy" / "base" / "unet").is_dir()
    pipe = ReferencePipeline.from_recipe(recipe)
    names = committed_craft_loras()
    assert list(pipe.loras) == names
    if {"star", "checker"} <= set(names):
        request = GenerateRequest(prompts=("a sks object <c> in zzs style <s>",), content="star", style="checker",
                                  seed=3, steps=4)
    else:  # a checkout without the LoRAs: the recipe is the base alone
        request = GenerateRequest(prompts=("a red circle",), seed=3, steps=4)
    image = pipe.generate(request)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8


@pytest.mark.extended  # ~50 s; .ci/run runs it (make test-extended)
def test_train_command_runs_end_to_end_quick(tmp_path, capsys):
    """``craft toyworld train --quick``: every stage for a few steps (a smoke test of the command, not a model)."""
    assert craft(["toyworld", "train", "--out", str(tmp_path), "--quick"]) == 0
    assert "toy world trained" in capsys.readouterr().out
    base = tmp_path / "base"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (base / sub).is_dir(), sub
    log = json.loads((base / "train_log.json").read_text())
    assert log["config"]["unet_steps"] == "3" and len(log["unet_loss"]) == 1
    assert set(log["cpu_seconds"]) == set(log["seconds"]) == {"render", "vae", "unet", "total"}
    assert 0 < log["cpu_seconds"]["unet"] <= log["cpu_seconds"]["total"]
    assert Judges.load(tmp_path / "judges.safetensors") is not None
    judges_log = json.loads((tmp_path / "judges_log.json").read_text())
    assert judges_log["steps"] == 3 and judges_log["config"]["p_clean"] == 0.125
    assert [c["step"] for c in judges_log["monitor"]] == [3]  # the last step is always checked


def test_degrade_keeps_some_renders_clean_and_darkens_only_objects():
    from craft_toyworld.judges import degrade, render_pool, to_input

    images, _, _ = render_pool(5, 32)
    x = to_input(images)
    y = degrade(x, torch.Generator().manual_seed(0), p_dark=1.0, p_clean=0.5)
    clean = [bool(torch.equal(a, b)) for a, b in zip(x, y)]
    assert 4 <= sum(clean) <= 28 and y.shape == x.shape and float(y.abs().max()) <= 1.0
    assert torch.equal(degrade(x, torch.Generator().manual_seed(0), p_dark=1.0, p_clean=0.5), y)  # seeded
    assert sum(bool(torch.equal(a, b)) for a, b in zip(x, degrade(x, torch.Generator().manual_seed(1), p_clean=0.0))) == 0


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.skipif(not os.environ.get("CRAFT_TEST_JUDGE_TRAINING"),
                    reason="~10 min of CPU (measured by hand: 100 % / 99.4 %); set CRAFT_TEST_JUDGE_TRAINING=1 to run it")
@needs_assets
def test_judge_trainer_reaches_98_percent_from_its_seed(tmp_path):
    """``craft toyworld train-judges`` with its defaults (seed 0) on the committed base: >= 98 % shape and
    style accuracy on 1000 fresh renders (about 20 min of one core; README "Toy world" has the figures)."""
    from craft_toyworld.train_all import train_judges_for

    out = train_judges_for(ASSETS / "base", tmp_path / "judges.safetensors")
    acc = json.loads(out.with_name("judges_log.json").read_text())["accuracy_fresh_renders"]
    assert acc["shape"] >= 0.98 and acc["style"] >= 0.98, acc


def test_train_defaults_are_the_committed_base_settings():
    """``craft toyworld train --out DIR`` reproduces the committed base: the defaults are its recorded settings."""
    from dataclasses import asdict

    from craft_toyworld.train_base import BaseTrainConfig

    recorded = json.loads((ASSETS / "base" / "train_log.json").read_text())["config"]
    defaults = {k: str(v) for k, v in asdict(BaseTrainConfig(out=Path("x"))).items() if k != "out"}
    assert defaults == {k: v for k, v in recorded.items() if k != "out"}


@needs_assets
def test_compare_command_writes_both_methods(tmp_path, capsys):
    """``craft toyworld compare``: CRAFT-LoRA and the direct merge of the committed LoRAs, one labelled sheet."""
    if not {"star", "checker"} <= set(committed_craft_loras()):
        pytest.skip("the committed CRAFT LoRAs are missing")
    out = tmp_path / "cmp.png"
    assert craft(["toyworld", "compare", "--content", "star", "--style", "checker", "--seed", "7", "--n", "1",
                  "--out", str(out)]) == 0
    assert "seeds 7..7" in capsys.readouterr().out
    sheet = np.asarray(Image.open(out))
    assert sheet.shape[0] == 2 * (128 + 4)  # two rows of 2x-scaled 64 px tiles
    assert craft(["toyworld", "compare", "--content", "checker", "--style", "star", "--out", str(out)]) == 2


def test_base_trainer_is_deterministic_from_its_seed(tmp_path):
    """Two runs of the base trainer (a few steps of each stage, the committed recipe's code path: plain
    attention processor, fused AdamW, foreach EMA, channels-last VAE) write equal weights."""
    from safetensors.torch import load_file

    from craft_toyworld.train_all import QUICK
    from craft_toyworld.train_base import BaseTrainConfig, train_base

    settings = {**QUICK, "images": 16, "vae_steps": 4, "unet_steps": 4}
    runs = [train_base(BaseTrainConfig(out=tmp_path / str(k), seed=3, **settings)) for k in range(2)]
    for part in ("unet", "vae"):
        a, b = (load_file(r / part / "diffusion_pytorch_model.safetensors") for r in runs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    unet = "unet/diffusion_pytorch_model.safetensors"
    first = load_file(runs[0] / unet)
    other = load_file(train_base(BaseTrainConfig(out=tmp_path / "other", seed=4, **settings)) / unet)
    assert not all(torch.equal(other[k], first[k]) for k in first)  # the seed matters
