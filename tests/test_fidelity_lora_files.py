"""LoRA files written by the project load in diffusers, and LoRA semantics equal diffusers'.

A LoRA whose modules all lie in the content layer set, at gate 1 over the whole trajectory in
``--mode cfg``, gives the image diffusers gives after ``load_lora_weights`` (max 1/255).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from craft_reference.demo import lora_target_modules
from craft_export.loading import load_lora, read_lora_file, unet_module_shapes
from craft_export.lora_files import (
    LoraFileError,
    adapter_metadata,
    metadata_alphas,
    save_kohya_lora,
    save_lora,
)
from craft_reference.pipeline import ReferencePipeline
from craft_ops.request import GenerateRequest
from craft_ops.routing import resolve_routing
from fidelity_util import diffusers_images, load_diffusers, max_diff, mean_diff

pytest.importorskip("peft")

OMEGA = {"sd15": 6.5, "sdxl": 4.0}


@pytest.fixture(scope="module")
def pipes(demo_dir):
    return {arch: load_diffusers(demo_dir / f"{arch}-tiny", arch) for arch in ("sd15", "sdxl")}


def _content_factors(unet, arch, rank=4, seed=0):
    shapes = unet_module_shapes(unet)
    modules = resolve_routing(arch).select("content", lora_target_modules(shapes))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        s = shapes[m]
        A = torch.randn((rank, *s[1:]), generator=g) / float(np.prod(s[1:])) ** 0.5
        B = torch.randn((s[0], rank, *(1,) * (len(s) - 2)), generator=g) * 0.5
        out[m] = (A, B)
    return out


def _write(layout, path, factors, unet):
    if layout == "peft":
        return save_lora(path, factors, alpha=2.0, metadata={"craft.kind": "content"})
    if layout == "kohya":
        return save_kohya_lora(path, factors, alpha=2.0)
    if layout == "kohya-sgm":
        return save_kohya_lora(path, factors, alpha=2.0, unet_modules=[n for n, _ in unet.named_modules()])
    if layout == "legacy":  # diffusers' old attention-processor-era layout: no alpha, scale 1
        sd = {}
        for m, (A, B) in factors.items():
            sd[f"unet.{m}.lora.down.weight"] = A.contiguous()
            sd[f"unet.{m}.lora.up.weight"] = (B * 0.5).contiguous()
        save_file(sd, str(path))
        return path
    raise ValueError(layout)


def _ours(folder, arch, path, prompt="a dog <c>", seed=5):
    ref = ReferencePipeline.from_folder(folder, resolve_routing(arch), {"x": ("content", path)})
    req = GenerateRequest(prompts=(prompt,), content="x", seed=seed, steps=6, guidance=OMEGA[arch], height=64,
                          width=64, mode="cfg", content_window=(0.0, 1.0), scheduler="euler")
    return ref.generate(req), ref


@pytest.mark.parametrize("arch, layout", [("sd15", "peft"), ("sd15", "kohya"), ("sd15", "legacy"),
                                          ("sdxl", "peft"), ("sdxl", "kohya-sgm")])
def test_written_lora_matches_diffusers(demo_dir, pipes, tmp_path, arch, layout):
    pipe = pipes[arch]
    folder = demo_dir / f"{arch}-tiny"
    path = _write(layout, tmp_path / f"{layout}.safetensors", _content_factors(pipe.unet, arch), pipe.unet)
    ours, ref = _ours(folder, arch, path)
    pipe.load_lora_weights(str(path), adapter_name="x")
    try:
        # diffusers' default call (no negative prompt): SDXL folders with force_zeros_for_empty_prompt
        # use zero embeddings there, as the project does for an empty negative prompt
        theirs = diffusers_images(pipe, "a dog", scheduler="euler", seed=5, steps=6, omega=OMEGA[arch], negative=None)
    finally:
        pipe.unload_lora_weights()
    assert max_diff(ours, theirs) <= 1
    plain = ref.generate(GenerateRequest(prompts=("a dog",), seed=5, steps=6, guidance=OMEGA[arch], height=64,
                                         width=64, mode="cfg"))
    assert mean_diff(ours, plain) > 5  # the LoRA itself moves the picture


def test_adapter_metadata_is_what_diffusers_reads(demo_dir, pipes, tmp_path):
    unet = pipes["sd15"].unet
    factors = _content_factors(unet, "sd15")
    modules = sorted(factors)
    # mixed ranks and alphas: the majority is the default, the rest go to the patterns
    factors[modules[0]] = (factors[modules[0]][0][:2], factors[modules[0]][1][:, :2])
    alphas = {m: 2.0 for m in modules} | {modules[1]: 3.0}
    path = save_lora(tmp_path / "mixed.safetensors", factors, alpha=alphas)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 2.0
    assert meta["unet.target_modules"] == modules
    assert meta["unet.rank_pattern"] == {f"^{modules[0]}": 2}
    assert meta["unet.alpha_pattern"] == {f"^{modules[1]}": 3.0}
    shapes = unet_module_shapes(unet)
    adapter, _ = load_lora(path, shapes, name="mixed")
    assert adapter.modules[modules[0]].rank == 2 and adapter.modules[modules[1]].alpha == 3.0
    assert adapter.modules[modules[2]].alpha == 2.0
    # diffusers builds its LoraConfig from the metadata and takes every module
    pipe = pipes["sd15"]
    pipe.load_lora_weights(str(path), adapter_name="mixed")
    try:
        config = pipe.unet.peft_config["mixed"]
        assert set(config.target_modules) == set(modules) and config.lora_alpha == 2.0
        layer = dict(pipe.unet.named_modules())[modules[1]]
        assert layer.scaling["mixed"] == 3.0 / 4
    finally:
        pipe.unload_lora_weights()


def test_project_lora_with_new_metadata_loads_in_diffusers(demo_dir, pipes, tmp_path):
    """The demo writer's PEFT-layout file carries complete ``adapter_metadata(...)`` (not just
    ``{"r", "lora_alpha"}``), so diffusers builds its LoraConfig from it."""
    tensors, old = read_lora_file(demo_dir / "loras" / "sd15-dog.safetensors")
    assert {"unet.r", "unet.lora_alpha", "unet.target_modules"} <= set(json.loads(old["lora_adapter_metadata"]))
    unet = pipes["sd15"].unet
    inside = set(resolve_routing("sd15").select("content", unet_module_shapes(unet)))
    kept = {k: v for k, v in tensors.items() if k.split(".lora_")[0].removeprefix("unet.") in inside}
    ranks = {k.removeprefix("unet.").split(".lora_A")[0]: int(v.shape[0]) for k, v in kept.items() if ".lora_A" in k}
    alpha = json.loads(old["lora_adapter_metadata"])["unet.lora_alpha"]
    path = tmp_path / "dog.safetensors"
    save_file(kept, str(path), metadata={**old, "lora_adapter_metadata": adapter_metadata(ranks, alpha)})
    ours, _ = _ours(demo_dir / "sd15-tiny", "sd15", path)
    pipe = pipes["sd15"]
    pipe.load_lora_weights(str(path), adapter_name="dog")
    try:
        theirs = diffusers_images(pipe, "a dog", scheduler="euler", seed=5, steps=6, omega=6.5)
    finally:
        pipe.unload_lora_weights()
    assert max_diff(ours, theirs) <= 1


def test_metadata_reading_and_refusals(tmp_path):
    modules = ["a.to_q", "b.to_q", "c.proj_in"]
    assert metadata_alphas({"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2})}, modules) == 2.0
    meta = {"lora_adapter_metadata": adapter_metadata({m: 4 for m in modules}, {"a.to_q": 1.0, "b.to_q": 8.0,
                                                                                 "c.proj_in": 8.0})}
    assert metadata_alphas(meta, modules) == {"a.to_q": 1.0, "b.to_q": 8.0, "c.proj_in": 8.0}
    assert metadata_alphas({"alpha": "3"}, modules) == 3.0 and metadata_alphas({}, modules) is None
    with pytest.raises(LoraFileError, match="use_rslora"):
        metadata_alphas({"lora_adapter_metadata": json.dumps({"unet.use_rslora": True, "unet.lora_alpha": 1})}, modules)
    with pytest.raises(LoraFileError, match="not valid JSON"):
        metadata_alphas({"lora_adapter_metadata": "{"}, modules)
    with pytest.raises(LoraFileError, match=r"alpha\['a.to_q'\]"):
        save_lora(tmp_path / "x.safetensors", {"a.to_q": (torch.ones(2, 3), torch.ones(3, 2))}, alpha=-1)
    with pytest.raises(LoraFileError, match=r"factors\['a.to_q'\]"):
        save_lora(tmp_path / "x.safetensors", {"a.to_q": (torch.ones(2, 3), torch.ones(3, 4))}, alpha=1)


def test_peft_dora_matches_diffusers(demo_dir, pipes, tmp_path):
    """A diffusers-layout DoRA LoRA (``lora_magnitude_vector``) on linear and conv modules, baked
    against W_init, gives diffusers' DoRA image. (diffusers drops kohya ``dora_scale`` keys for SD
    pipelines with a warning, so a kohya DoRA file has no diffusers image to compare with.)"""
    from craft_export.loading import unet_weights
    from craft_export.recipe_models import LoadedLora

    pipe = pipes["sd15"]
    weights = unet_weights(pipe.unet)
    g = torch.Generator().manual_seed(3)
    sd = {}
    for m, (A, B) in _content_factors(pipe.unet, "sd15").items():
        W = weights[m]
        norm = W.reshape(W.shape[0], -1).norm(dim=1)
        mag = norm * (0.7 + 0.6 * torch.rand(W.shape[0], generator=g))
        sd[f"unet.{m}.lora_A.weight"], sd[f"unet.{m}.lora_B.weight"] = A.contiguous(), B.contiguous()
        sd[f"unet.{m}.lora_magnitude_vector"] = (mag if W.ndim == 2 else mag.reshape(1, -1, 1, 1)).contiguous()
    path = tmp_path / "dora.safetensors"
    save_file(sd, str(path))
    ref = ReferencePipeline.from_folder(demo_dir / "sd15-tiny", resolve_routing("sd15"))
    adapter, _ = load_lora(path, ref.shapes, name="x", weights=ref.W_init)
    assert adapter.kinds == ("dora",)
    ref = ReferencePipeline(ref.parts, ref.routing, [LoadedLora("x", "content", adapter)])
    req = dict(seed=5, steps=6, guidance=6.5, height=64, width=64, mode="cfg")
    ours = ref.generate(GenerateRequest(prompts=("a dog <c>",), content="x", content_window=(0.0, 1.0), **req))
    pipe.load_lora_weights(str(path), adapter_name="x")
    try:
        theirs = diffusers_images(pipe, "a dog", scheduler="euler", seed=5, steps=6, omega=6.5)
    finally:
        pipe.unload_lora_weights()
    assert max_diff(ours, theirs) <= 1
    assert mean_diff(ours, ref.generate(GenerateRequest(prompts=("a dog",), **req))) > 5
