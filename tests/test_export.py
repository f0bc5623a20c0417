"""craft export: repository contents, config/ONNX consistency, variant weights, incremental re-export, bad recipes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from craft_export.exporter import ExportError, ExportOptions, export_repository
from craft_export.onnx_files import onnx_initializer_hashes, onnx_io
from craft_export.triton_config import config_io, parse_config_pbtxt
from craft_ops.aggregate import BASE, Variant
from craft_serving.manifest import read_manifest

CRAFT = str(Path(sys.executable).with_name("craft"))


def write_recipe(demo_dir: Path, arch: str, loras: list[str], path: Path) -> Path:
    from craft_reference.demo import recipe_text

    path.write_text(recipe_text(arch, loras, root=demo_dir))
    return path



def _manifest(repo: Path) -> dict:
    """The manifest as written (every model's export record included)."""
    return json.loads((repo / "manifest.json").read_text())

@pytest.fixture(scope="module")
def repos(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for arch in ("sd15", "sdxl"):
        recipe = write_recipe(demo_dir, arch, ["dog", "watercolor"], root / f"{arch}.toml")
        report = export_repository(ExportOptions(recipe=recipe, out=root / arch, runner="python"))
        out[arch] = (root / arch, recipe, report)
    return out


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_repository_layout_and_manifest(repos, arch):
    repo, _, report = repos[arch]
    view = read_manifest(repo)
    unets = {"unet_base", "unet_c-dog", "unet_s-watercolor", "unet_c-dog_s-watercolor"}
    nets = {"text_encoder", "vae_decoder"} | ({"text_encoder_2"} if arch == "sdxl" else set())
    assert set(report.built) == unets | nets | {"unet"} and not report.reused and not report.removed
    assert set(view.variants.values()) == unets
    # the Python runner: one Triton model serves every UNet weight set; the variants' folders hold weights only
    assert view.unet_model == "unet" and set(view.served) == nets | {"unet"}
    assert all(not (repo / u / "config.pbtxt").exists() and (repo / u / "1" / "model.onnx").is_file() for u in unets)
    assert (repo / "unet" / "config.pbtxt").is_file() and (repo / "unet" / "1" / "model.py").is_file()
    assert view.variants[BASE] == "unet_base"
    assert view.variants[Variant("dog", 1.0, "watercolor", 1.0)] == "unet_c-dog_s-watercolor"
    assert {l.name: l.kind for l in view.catalog.values()} == {"dog": "content", "watercolor": "style"}
    raw = _manifest(repo)
    dog = next(l for l in raw["loras"] if l["name"] == "dog")
    assert dog["format"] == "peft" and dog["rank"] == 4 and len(dog["sha256"]) == 64
    assert 0 < dog["coverage"]["routed"] == dog["coverage"]["content"] < dog["coverage"]["modules"]
    for name, record in raw["models"].items():
        if record.get("export") == "runner":  # the unet model: no network of its own
            continue
        assert max(record["parity_max_abs_err"].values()) <= record["parity_tolerance"], name
    for folder in ("craft_pipeline", "craft_pipeline_stream", "craft_catalog"):
        assert (repo / folder / "config.pbtxt").is_file() and (repo / folder / "1" / "model.py").is_file()
    assert not list(repo.parent.glob(".*staging*"))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_manifest_carries_force_zeros_for_empty_prompt(repos, arch, tmp_path):
    """The checkpoint's setting is written; manifests from before it get diffusers' default per arch."""
    from craft_serving.manifest import ManifestError

    repo, _, _ = repos[arch]
    raw = _manifest(repo)
    assert raw["force_zeros_for_empty_prompt"] is (arch == "sdxl")  # the tiny SDXL folder sets it, as SDXL base
    for value, expected in ((None, arch == "sdxl"), (False, False), (True, True), ("yes", ManifestError)):
        older = {k: v for k, v in raw.items() if k != "force_zeros_for_empty_prompt"}
        if value is not None:
            older["force_zeros_for_empty_prompt"] = value
        (tmp_path / "manifest.json").write_text(json.dumps(older))
        if expected is ManifestError:
            with pytest.raises(ManifestError, match="force_zeros_for_empty_prompt"):
                read_manifest(tmp_path)
        else:
            assert read_manifest(tmp_path).force_zeros_for_empty_prompt is expected


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_config_pbtxt_matches_onnx(repos, arch):
    repo, _, _ = repos[arch]
    for model in _manifest(repo)["models"]:
        if not (repo / model / "config.pbtxt").is_file():  # a variant's weights, served by the unet model
            continue
        io = config_io(parse_config_pbtxt(repo / model / "config.pbtxt"))
        inputs, outputs = onnx_io(repo / ("unet_base" if model == "unet" else model) / "1" / "model.onnx")
        if model == "unet":  # the UNet's tensors, then the per-sample weight selectors
            assert [t.name for t in io.inputs[len(inputs):]] == ["lora_content", "lora_style", "gate_c", "gate_s"]
            assert [t.model_shape for t in io.inputs[len(inputs):]] == [(-1,)] * 4
            io = replace(io, inputs=io.inputs[:len(inputs)])
        for side, onnx_side in ((io.inputs, inputs), (io.outputs, outputs)):
            assert [t.name for t in side] == [t.name for t in onnx_side], model
            for cfg_t, onnx_t in zip(side, onnx_side):
                assert cfg_t.dtype == onnx_t.dtype, (model, cfg_t.name)
                # the shape the model sees (batch and reshape applied): -1 wherever ONNX is symbolic
                assert list(cfg_t.model_shape) == [d if isinstance(d, int) else -1 for d in onnx_t.dims], (model, cfg_t)


def test_variant_weights_differ_only_in_their_layer_set(repos, ref_pipes):
    repo, _, _ = repos["sdxl"]
    routing = ref_pipes["sdxl"].routing
    base = onnx_initializer_hashes(repo / "unet_base" / "1" / "model.onnx")
    for model, kind in (("unet_c-dog", "content"), ("unet_s-watercolor", "style")):
        variant = onnx_initializer_hashes(repo / model / "1" / "model.onnx")
        assert variant.keys() == base.keys()
        changed = [n for n in base if base[n] != variant[n]]
        assert changed and set(changed) <= set(json.loads((repo / model / "1" / "changed.json").read_text()))
        modules = [n.removeprefix("inner.unet.").removesuffix(".weight") for n in changed]
        assert all(routing.layer_set(m) == kind for m in modules), (model, modules[:3])
    both = onnx_initializer_hashes(repo / "unet_c-dog_s-watercolor" / "1" / "model.onnx")
    c = onnx_initializer_hashes(repo / "unet_c-dog" / "1" / "model.onnx")
    s = onnx_initializer_hashes(repo / "unet_s-watercolor" / "1" / "model.onnx")
    assert {n for n in base if both[n] != base[n]} == {n for n in base if c[n] != base[n]} | {n for n in base if s[n] != base[n]}


def test_onnx_variant_equals_baked_pytorch(repos, ref_pipes):
    import onnxruntime as ort

    from craft_ops.conditioning import unet_inputs
    from craft_ops.sampling import UNetCall

    repo, _, _ = repos["sd15"]
    pipe = ref_pipes["sd15"]
    g = torch.Generator().manual_seed(11)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor(321.0)
    cond = pipe.encode(["a dog", "a cat"], 64, 96)
    for model, variant in (("unet_c-dog_s-watercolor", Variant("dog", 1.0, "watercolor", 1.0)), ("unet_base", BASE)):
        sess = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {k: v.numpy() for k, v in unet_inputs(x, t, cond).items()}
        got = sess.run(None, feeds)[0]
        ref = pipe.denoise([UNetCall(x, t, cond, variant)])[0].numpy()
        assert np.abs(got - ref).max() < 1e-4, model


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _export_json(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([CRAFT, "export", "--recipe", str(recipe), "--out", str(out), "--runner", "python", "--json",
                           *extra], capture_output=True, text=True, timeout=900)


@pytest.mark.extended  # ~80 s; .ci/run runs it (make test-extended)
def test_incremental_reexport(demo_dir, tmp_path):
    recipe = write_recipe(demo_dir, "sd15", ["dog", "watercolor"], tmp_path / "r.toml")
    repo = tmp_path / "repo"
    first = _export_json(recipe, repo)
    assert first.returncode == 0, first.stderr
    # add a style LoRA: only its variants are built
    write_recipe(demo_dir, "sd15", ["dog", "watercolor", "fire"], recipe)
    second = _export_json(recipe, repo)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert sorted(summary["built"]) == ["unet_c-dog_s-fire", "unet_s-fire"]
    assert "unet_base" in summary["reused"] and "unet_c-dog_s-watercolor" in summary["reused"]
    assert summary["removed"] == [] and summary["seconds"] > 0
    # nothing changed: everything reused
    third = json.loads(_export_json(recipe, repo).stdout.strip().splitlines()[-1])
    assert third["built"] == [] and third["removed"] == []
    # remove a LoRA: its models go away
    write_recipe(demo_dir, "sd15", ["dog", "fire"], recipe)
    fourth = json.loads(_export_json(recipe, repo).stdout.strip().splitlines()[-1])
    assert fourth["built"] == [] and sorted(fourth["removed"]) == ["unet_c-dog_s-watercolor", "unet_s-watercolor"]
    assert not (repo / "unet_s-watercolor").exists()
    assert "watercolor" not in read_manifest(repo).catalog
    # --pairs restricts the pair variants
    fifth = json.loads(_export_json(recipe, repo, "--pairs", "none").stdout.strip().splitlines()[-1])
    assert fifth["removed"] == ["unet_c-dog_s-fire"]


BAD_RECIPES = {
    "missing lora file": ("[[lora]]\nname = \"ghost\"\nkind = \"style\"\npath = \"{d}/loras/none.safetensors\"\n", "not found"),
    "pickle lora": ("[[lora]]\nname = \"pick\"\nkind = \"style\"\npath = \"{d}/x.ckpt\"\n", "pickle"),
    "bad name": ("[[lora]]\nname = \"a b\"\nkind = \"style\"\npath = \"{d}/loras/sd15-fire.safetensors\"\n", r"lora\[2\]\.name"),
    "duplicate name": ("[[lora]]\nname = \"dog\"\nkind = \"style\"\npath = \"{d}/loras/sd15-fire.safetensors\"\n", "duplicate"),
    "wrong arch lora": ("[[lora]]\nname = \"xl\"\nkind = \"style\"\npath = \"{d}/loras/sdxl-fire.safetensors\"\n", "does not fit"),
    "nan lora": ("[[lora]]\nname = \"nan\"\nkind = \"style\"\npath = \"{d}/nan.safetensors\"\n", "NaN"),
}


@pytest.fixture(scope="module")
def bad_files(demo_dir):
    from safetensors.torch import load_file, save_file

    torch.save({"x": torch.zeros(1)}, demo_dir / "x.ckpt")
    sd = load_file(str(demo_dir / "loras" / "sd15-fire.safetensors"))
    key = sorted(sd)[0]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, str(demo_dir / "nan.safetensors"))


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipes_leave_repo_untouched(repos, demo_dir, tmp_path, bad_files, case):
    repo, recipe, _ = repos["sd15"]
    before = _tree_digest(repo)
    lines = recipe.read_text()
    snippet, needle = BAD_RECIPES[case]
    bad = tmp_path / "bad.toml"
    bad.write_text(lines.replace("[defaults]", snippet.format(d=demo_dir) + "\n[defaults]"))
    with pytest.raises((ExportError, ValueError), match=needle):
        export_repository(ExportOptions(recipe=bad, out=repo, runner="python"))
    assert _tree_digest(repo) == before


def test_bad_export_cli_cases(repos, demo_dir, tmp_path):
    repo, recipe, _ = repos["sd15"]
    before = _tree_digest(repo)
    for args, needle in (
        (["--pairs", "dog+nobody"], "--pairs"),
        (["--runtime", "tensorrt"], "tensorrt"),
    ):
        r = _export_json(recipe, repo, *args)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    r = _export_json(recipe, foreign)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert _tree_digest(repo) == before and (foreign / "keep.txt").read_text() == "mine"


def test_hostile_lora_header_and_paths_outside_confine_to_are_refused(repos, demo_dir, tmp_path):
    """A LoRA whose header claims more bytes than the file holds, and (with --confine-to) a LoRA that is a
    symlink out of the allowed folder: both refused with the file named, the repository untouched."""
    repo, recipe, _ = repos["sd15"]
    before = _tree_digest(repo)
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes((10**9).to_bytes(8, "little") + b'{"a": 1}')
    outside = tmp_path / "outside.safetensors"  # a fine LoRA file, in the wrong place
    outside.write_bytes((demo_dir / "loras" / "sd15-fire.safetensors").read_bytes())
    escape = demo_dir / "escape.safetensors"
    escape.unlink(missing_ok=True)
    escape.symlink_to(outside)
    for path, options, needle in ((liar, {}, f"{liar}: header: declared header length .* larger than the file"),
                                  (escape, {"confine_to": (demo_dir,)},
                                   f"lora 'x'.path: {outside} .*outside the allowed folders")):
        bad = demo_dir / f"bad-{path.stem}.toml"  # inside the confined folder: only the LoRA escapes
        bad.write_text(recipe.read_text().replace(
            "[defaults]", f'[[lora]]\nname = "x"\nkind = "style"\npath = "{path}"\n\n[defaults]'))
        with pytest.raises((ExportError, ValueError), match=needle):
            export_repository(ExportOptions(recipe=bad, out=repo, runner="python", **options))
    assert _tree_digest(repo) == before


def _digest_outside_staging(repo: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(repo.rglob("*")):
        rel = p.relative_to(repo)
        if rel.parts[0] != ".craft-staging":
            h.update(str(rel).encode())
            h.update(p.read_bytes() if p.is_file() else b"")
    return h.hexdigest()


def _overflowing_lora(demo_dir: Path, out: Path) -> Path:
    """Finite factors whose product overflows fp32: passes every load-time check, fails when baked."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(demo_dir / "loras" / "sd15-fire.safetensors"))
    save_file({k: v * 1e20 if v.ndim >= 2 else v for k, v in sd.items()}, str(out))
    return out


@pytest.mark.extended  # 10-45 s; `make test` stays near 10 min, .ci/run runs it (make test-extended)
def test_failed_exports_leave_the_repository_byte_identical(repos, demo_dir, tmp_path):
    """A corrupt LoRA found late (after models were built), a file-size limit (a full disk's stand-in:
    RLIMIT_FSIZE, EFBIG) and kill -9 mid-build: every file of REPO is as it was (sha256 of every file;
    a killed export's hidden .craft-staging folder aside); the next export removes that and succeeds."""
    import resource
    import signal
    import time

    repo, recipe, _ = repos["sd15"]
    before, before_outside = _tree_digest(repo), _digest_outside_staging(repo)
    # 1. late: 'bull' is fine and built first, then the overflowing 'fire' fails its first variant
    late = write_recipe(demo_dir, "sd15", ["dog", "watercolor", "bull", "fire"], tmp_path / "late.toml")
    late.write_text(late.read_text().replace(str(demo_dir / "loras" / "sd15-fire.safetensors"),
                                             str(_overflowing_lora(demo_dir, tmp_path / "fire.safetensors"))))
    progress: list[str] = []
    with pytest.raises((ExportError, ValueError), match="non-finite delta"):
        export_repository(ExportOptions(recipe=late, out=repo, runner="python"), progress=progress.append)
    assert sum("baking" in m for m in progress) >= 2, progress  # at least one model was finished first
    assert _tree_digest(repo) == before
    grown = write_recipe(demo_dir, "sd15", ["dog", "watercolor", "fire"], tmp_path / "grown.toml")
    cmd = [CRAFT, "export", "--recipe", str(grown), "--out", str(repo), "--runner", "python"]

    # 2. no room: files over 1 MB (every UNet's ONNX) cannot be written
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, preexec_fn=small_files)
    assert r.returncode == 2 and "the repository is unchanged" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _tree_digest(repo) == before
    # 3. kill -9 while the first new model is being built
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = repo / ".craft-staging" / "models"
    deadline = time.monotonic() + 600
    while not (staged.is_dir() and any(staged.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    assert (repo / ".craft-staging").is_dir() and _digest_outside_staging(repo) == before_outside
    # 4. the next export clears what the killed one left and succeeds
    report = export_repository(ExportOptions(recipe=grown, out=repo, runner="python"))
    assert sorted(report.built) == ["unet_c-dog_s-fire", "unet_s-fire"] and not (repo / ".craft-staging").exists()
    assert "fire" in read_manifest(repo).catalog


@pytest.mark.gpu
def test_tensorrt_export_builds_and_refits(demo_dir, tmp_path):
    recipe = write_recipe(demo_dir, "sd15", ["dog", "watercolor"], tmp_path / "r.toml")
    report = export_repository(ExportOptions(recipe=recipe, out=tmp_path / "trt", runtime="tensorrt",
                                             precision="fp16", runner="native"))
    raw = _manifest(tmp_path / "trt")
    assert (tmp_path / "trt" / "unet_base" / "1" / "model.plan").is_file()
    refits = [r for r in raw["models"].values() if r.get("trt_build") == "refit"]
    assert refits and all(r["trt_max_abs_err_vs_onnx"] < 5e-2 for r in raw["models"].values() if "trt_max_abs_err_vs_onnx" in r)
    # served from model.plan: a variant's ONNX is gone once its engine is checked, W_init's stays
    for name, record in raw["models"].items():
        if record.get("trt_build") == "refit":
            assert record["onnx_removed"] and not list((tmp_path / "trt" / name / "1").glob("model.onnx*"))
    assert (tmp_path / "trt" / "unet_base" / "1" / "model.onnx").is_file()
    assert report.built
