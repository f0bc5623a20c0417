"""``craft export --lora-mode runtime`` and the runtime-LoRA runner with its LoRA cache (issue 14).

One runtime repository of the tiny SD 1.5 demo recipe (2 content + 2 style LoRAs, rank 4, max
rank 8) is exported once; the runner (ONNX Runtime + LoRA cache, :mod:`craft_serving.runtime_unet`)
is checked against the baked variants (Eq. 8 weights in PyTorch, and the repository's own baked
``unet_base`` engine for the unconditional branch), then a new LoRA is registered on the live
repository through the CLI.

Tolerance: fp32 on CPU; measured max |runner - baked| ~3e-6 on outputs of magnitude ~2.6; the
unconditional row equals ``unet_base``'s ONNX output exactly (scale 0 adds exact zeros). Held to 1e-4.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from craft_ops.aggregate import Variant

TOL = 1e-4
MAX_RANK = 8


@pytest.fixture(scope="module")
def runtime_repo(demo_dir, tmp_path_factory, one_torch_thread):
    from craft_export.exporter import ExportOptions, export_repository

    out = tmp_path_factory.mktemp("rt_repo") / "repo"
    report = export_repository(ExportOptions(recipe=demo_dir / "recipe-sd15.toml", out=out, lora_mode="runtime",
                                             max_rank=MAX_RANK, runner="python"))
    return out, report


@pytest.fixture(scope="module")
def reference(demo_dir):
    """Baked weights of any variant (PyTorch), the UNet wrapper and seeded UNet inputs."""
    from craft_export.bake import VariantBaker
    from craft_export.loading import unet_weights
    from craft_export.network_specs import network_specs
    from craft_export.networks import UNetNet
    from craft_export.onnx_export import example_inputs
    from craft_export.recipe_models import load_recipe_models

    m = load_recipe_models(demo_dir / "recipe-sd15.toml")
    baker = VariantBaker(unet_weights(m.parts.unet), m.shapes, m.recipe.routing, m.loras.values())
    spec = network_specs("sd15", m.parts)["unet"]
    return m, baker, UNetNet(m.parts.unet).eval(), example_inputs(spec, hw=(64, 64), batch=4, seed=9)


def _baked(reference, variants, inputs=None, baker=None):
    m, default_baker, net, x = reference
    x = inputs or x
    baker = baker or default_baker
    with torch.no_grad():
        return torch.cat([torch.func.functional_call(net, baker.params_for(v, cache=False), (),
                                                     {k: t[b:b + 1] for k, t in x.items()}, strict=False)
                          for b, v in enumerate(variants)])


def test_runtime_mode_with_the_native_runner_is_refused(demo_dir, tmp_path):
    """The native backends cannot pick factors per sample: refused before anything is loaded or written."""
    from craft_export.exporter import ExportError, ExportOptions, export_repository

    with pytest.raises(ExportError, match=r"^--runner: .*\(got 'native'\)$"):
        export_repository(ExportOptions(recipe=demo_dir / "recipe-sd15.toml", out=tmp_path / "repo",
                                        lora_mode="runtime", runner="native"))
    assert not (tmp_path / "repo").exists()


def test_runtime_repository_contents(runtime_repo):
    out, report = runtime_repo
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lora_mode"] == "runtime"
    rt = manifest["runtime_lora"]
    assert rt["max_rank"] == MAX_RANK and rt["modules"] > 0
    assert set(report.built) == {"text_encoder", "vae_decoder", "unet_base", "unet_lora", "unet"}
    assert manifest["networks"]["unet"] == "unet"  # the one Triton model serving W_init and the runtime network
    # no baked LoRA variant: W_init only (the unconditional branch / hot-pair source)
    assert [v["model"] for v in manifest["variants"]] == ["unet_base"]
    assert not [p for p in out.iterdir() if p.name.startswith("unet_c-") or p.name.startswith("unet_s-")]
    assert manifest["models"]["unet_lora"]["parity_max_abs_err"]["noise_pred"] < TOL
    for rec in manifest["loras"]:
        assert (out / rec["factors"]).is_file(), rec
    assert sorted(report.loras["written"]) == ["bull", "dog", "fire", "watercolor"]


def test_runner_equals_baked_variants(runtime_repo, reference):
    """Different LoRAs, continuous gates and the unconditional branch in ONE call == baked variants."""
    from craft_export.ort import OrtSession
    from craft_serving.runtime_unet import RuntimeUNet

    out, _ = runtime_repo
    x = reference[3]
    variants = [Variant("dog", 1.0, "watercolor", 1.0), Variant(), Variant("bull", 0.4), Variant(style="fire", gamma_s=0.8)]
    runner = RuntimeUNet(out, threads=1)
    got = runner(x, variants)
    assert float((got - _baked(reference, variants)).abs().max()) < TOL
    w_init = OrtSession(out / "unet_base" / "1" / "model.onnx", threads=1).run_torch(
        {k: t[1:2] for k, t in x.items()})["noise_pred"]
    assert torch.equal(got[1:2], w_init)  # unconditional = scale 0 = W_init, exactly
    assert float((got[0] - got[1]).abs().max()) > 1e-2  # the LoRAs act
    with pytest.raises(ValueError, match=r"content: unknown LoRA 'nope'"):
        runner(x, [Variant("nope", 1.0)] + [Variant()] * 3)
    with pytest.raises(ValueError, match=r"style: 'dog' is a content LoRA"):
        runner(x, [Variant(style="dog", gamma_s=1.0)] + [Variant()] * 3)


@pytest.mark.extended
def test_lora_cache_lru_and_split_calls(runtime_repo, reference):
    """A cache of one LoRA per kind: a call with two content LoRAs is split, LRU evicts, results unchanged."""
    from craft_serving.runtime_unet import RuntimeUNet

    out, _ = runtime_repo
    runner = RuntimeUNet(out, threads=1, cache_mb=1e-6)  # the minimum: slot 0 + one slot per kind
    assert runner.cache.capacity == 1
    variants = [Variant("dog", 1.0), Variant("bull", 1.0, "fire", 1.0), Variant("dog", 0.5, "watercolor", 1.0),
                Variant()]
    got = runner(reference[3], variants)
    assert float((got - _baked(reference, variants)).abs().max()) < TOL
    assert runner.cache.evictions >= 2
    assert runner.cache.resident("content") == [("dog", runner.loras["dog"][2])]


def test_register_new_lora_without_rebuilding(runtime_repo, reference, demo_dir, tmp_path, capsys):
    """A new LoRA on a live runtime repository: factor file + manifest only, served on the next call."""
    from safetensors.torch import save_file

    from craft_cli.app import main
    from craft_export.bake import VariantBaker
    from craft_export.loading import unet_weights
    from craft_export.recipe_models import LoadedLora, load_recipe_models
    from craft_reference.demo import lora_target_modules, make_lora_state_dict, recipe_text
    from craft_serving.runtime_unet import RuntimeUNet

    out, _ = runtime_repo
    m = reference[0]
    runner = RuntimeUNet(out, threads=1)
    onnx_stat = (out / "unet_lora" / "1" / "model.onnx").stat()
    recipe = recipe_text("sd15", root=demo_dir)  # absolute paths: the recipes live in tmp_path
    for name, rank in (("ink", 6), ("huge", 16)):
        sd = make_lora_state_dict(m.shapes, lora_target_modules(m.shapes), rank=rank, alpha=rank, seed=rank, fmt="peft")
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    entry = '[[lora]]\nname = "{0}"\nkind = "style"\npath = "{1}/{0}.safetensors"\n\n'
    head, tail = recipe.split("[defaults]")
    for name in ("ink", "huge"):
        (tmp_path / f"recipe-{name}.toml").write_text(head + entry.format(name, tmp_path) + "[defaults]" + tail)
    args = ["export", "--out", str(out), "--lora-mode", "runtime", "--max-rank", str(MAX_RANK), "--runner", "python",
            "--json"]
    # a rank above the network's max rank: refused naming the rank, repository untouched
    before = (out / "manifest.json").read_bytes()
    assert main(args + ["--recipe", str(tmp_path / "recipe-huge.toml")]) != 0
    assert "'huge' has rank 16" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before
    t0 = time.perf_counter()
    assert main(args + ["--recipe", str(tmp_path / "recipe-ink.toml")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fast_path"] and summary["built"] == [] and summary["loras"]["written"] == ["ink"]
    variants = [Variant("dog", 1.0, "ink", 1.0), Variant(style="ink", gamma_s=0.5), Variant(), Variant("bull", 1.0)]
    got = runner(reference[3], variants)  # the same runner: no restart
    registered_to_served = time.perf_counter() - t0
    assert (out / "unet_lora" / "1" / "model.onnx").stat().st_mtime_ns == onnx_stat.st_mtime_ns  # not rebuilt
    manifest = json.loads((out / "manifest.json").read_text())
    ink = next(r for r in manifest["loras"] if r["name"] == "ink")
    assert ink["rank"] == 6 and (out / ink["factors"]).is_file()
    ink_model = load_recipe_models(tmp_path / "recipe-ink.toml").loras["ink"]
    baker = VariantBaker(unet_weights(m.parts.unet), m.shapes, m.recipe.routing,
                         [*m.loras.values(), LoadedLora("ink", "style", ink_model.adapter)])
    assert float((got - _baked(reference, variants, baker=baker)).abs().max()) < TOL
    print(f"new LoRA registered (in-process CLI) and served in {registered_to_served:.2f} s")


def test_registration_imports_no_torch(runtime_repo, reference, demo_dir, tmp_path):
    """``craft export`` registering a LoRA (bf16 file) runs without torch, diffusers or ONNX in the process, and
    writes the factors the torch path computes, bit for bit."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from craft_export.loading import load_lora
    from craft_export.runtime_export import read_factors, read_layout_files
    from craft_ops.runtime_lora import runtime_factors
    from craft_reference.demo import lora_target_modules, make_lora_state_dict, recipe_text

    out, _ = runtime_repo
    m = reference[0]
    sd = make_lora_state_dict(m.shapes, lora_target_modules(m.shapes), rank=3, alpha=1.0, seed=33, fmt="kohya")
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(path))
    head, tail = recipe_text("sd15", root=demo_dir).split("[defaults]")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(head + f'[[lora]]\nname = "bf"\nkind = "style"\npath = "{path}"\n\n[defaults]' + tail)
    heavy = ("torch", "diffusers", "transformers", "onnx", "onnxruntime")
    code = ("import json, sys\nfrom craft_cli.app import main\nrc = main(sys.argv[1:])\n"
            f"print(json.dumps({{'rc': rc, 'loaded': sorted(m for m in {heavy!r} if m in sys.modules)}}))")
    run = subprocess.run([sys.executable, "-c", code, "export", "--recipe", str(recipe), "--out", str(out),
                          "--lora-mode", "runtime", "--max-rank", str(MAX_RANK), "--runner", "python", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary, probe = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert summary["fast_path"] and summary["loras"]["written"] == ["bf"], summary
    assert probe == {"rc": 0, "loaded": []}
    record = next(r for r in json.loads((out / "manifest.json").read_text())["loras"] if r["name"] == "bf")
    kind, written = read_factors(out / record["factors"])
    layout, shapes = read_layout_files(out / "unet_lora")
    adapter, _ = load_lora(path, shapes, name="bf")
    expected = runtime_factors(adapter, "style", m.recipe.routing, layout)
    assert kind == "style" and set(written) == set(expected)
    for module, (A, B) in expected.items():
        assert torch.equal(written[module][0], A) and torch.equal(written[module][1], B), module


@pytest.mark.parametrize("content,style,gamma_c", [("dog", "watercolor", 0.6),
                                                   pytest.param(None, None, None, marks=pytest.mark.extended)])
def test_image_runtime_equals_baked(runtime_repo, ref_pipes, content, style, gamma_c):
    """The time-gated ACFG loop on the runtime repository (cond + uncond as ONE batch-2 call per step,
    a continuous gamma_c) gives the baked reference image within 1/255; without LoRAs every call
    runs on the repository's baked ``unet_base`` and the runtime network is never called."""
    import numpy as np

    from craft_export.ort import OrtSession
    from craft_ops.aggregate import BASE
    from craft_ops.conditioning import run_plan
    from craft_ops.request import GenerateRequest
    from craft_serving.runtime_denoise import RoutedDenoiser
    from craft_serving.runtime_unet import RuntimeUNet

    out, _ = runtime_repo
    ref = ref_pipes["sd15"]
    prompt = "a dog <c> in watercolor style <s>" if content else "a dog"
    request = GenerateRequest(prompts=(prompt,), content=content, style=style, seed=3, gamma_c=gamma_c,
                              height=64, width=64)
    want = ref.generate(request)
    runner, base = RuntimeUNet(out, threads=1), OrtSession(out / "unet_base" / "1" / "model.onnx", threads=1)
    batches = []

    def runtime(inputs, variants):
        batches.append([str(v) for v in variants])
        return runner(inputs, variants)

    denoise = RoutedDenoiser(runtime, lambda v: (lambda x: base.run_torch(x)["noise_pred"]) if v == BASE else None)
    plan = ref.plan(request)
    scale = ref.parts.latent_scale
    got = run_plan(plan, ref.encode, denoise, ref.decode, (4, plan.height // scale, plan.width // scale),
                   ref.parts.scheduler_config, force_zeros_for_empty_prompt=ref.force_zeros_for_empty_prompt)
    assert got.shape == want.shape
    assert int(np.abs(got.astype(np.int16) - want.astype(np.int16)).max()) <= 1
    if content:
        steps = plan.groups[0].config.steps
        assert len(batches) == steps and all(len(b) == 2 and b[1] == "W_init" for b in batches)
        assert "c=dog@0.6" in batches[0][0]
    else:
        assert batches == []


def test_merged_variants_equal_baked_and_follow_their_lora(runtime_repo, reference):
    """From a variant's second call on, the runner runs it on W_init's graph with the LoRAs merged in
    memory (``MergedVariants``): same outputs as the baked variants and as the runtime network; a
    re-registered LoRA's merged variants are dropped."""
    from craft_serving.unet_weights import UNetWeights

    out, _ = runtime_repo
    x = reference[3]
    variants = [Variant("dog", 1.0, "watercolor", 0.7), Variant(), Variant("bull", 0.4), Variant(style="fire", gamma_s=0.8)]
    want = _baked(reference, variants)
    runner = UNetWeights(out, threads=1, merge_background=False)
    first = runner(x, variants)  # every LoRA row on the fed session (W_init's graph, merged weights fed)
    assert runner.merged.built == 0
    second = runner(x, variants)  # each LoRA variant merged, then run on its own session
    assert runner.merged.built == 3 and set(runner.merged.held) == {v for v in variants if not v.is_base}
    assert float((second - want).abs().max()) < TOL
    assert float((second - first).abs().max()) < TOL
    assert torch.equal(runner(x, variants), second) and runner.merged.built == 3  # held: no rebuild
    # a re-registered dog LoRA (new factors key): what merged it is dropped, the rest stays
    keys = {n: entry[2] for n, entry in runner.runtime.loras.items()}
    runner.merged.keep_only({**keys, "dog": "re-registered"})
    assert set(runner.merged.held) == {Variant("bull", 0.4), Variant(style="fire", gamma_s=0.8)}


def test_fed_weights_equal_baked_without_a_session_per_variant(runtime_repo, reference):
    """With merging off, a LoRA variant runs on ONE session of W_init's graph whose routed weights are
    inputs, fed the variant's merged weights (``FedWeights``): same outputs as the baked variants, the
    runtime network never called, each LoRA at a gate merged once and held (LRU, by factors key), and
    a content + style variant made of what its content-only and style-only variants merged."""
    from craft_serving.unet_weights import UNetWeights

    out, _ = runtime_repo
    x = reference[3]
    variants = [Variant("dog", 1.0, "watercolor", 0.7), Variant(), Variant("bull", 0.4), Variant(style="fire", gamma_s=0.8)]
    want = _baked(reference, variants)
    runner = UNetWeights(out, threads=1, merged_variants=0, fed_variants=3)
    runtime_rows = []
    inner = runner.denoiser.runtime
    runner.denoiser.runtime = lambda inputs, vs: runtime_rows.append(len(vs)) or inner(inputs, vs)
    fed = runner.merged.fed
    got = runner(x, variants)
    assert float((got - want).abs().max()) < TOL and runtime_rows == []
    assert fed.merges == 4 and len(fed.units) == 3  # dog@1, watercolor@0.7, bull@0.4, fire@0.8; 3 held
    assert fed.names and all(n.startswith("inner.unet.") and n.endswith(".weight") for n in fed.names)
    assert torch.equal(runner({k: v[2:] for k, v in x.items()}, variants[2:]), got[2:])
    assert fed.merges == 4  # held: not merged again
    keys = {n: entry[2] for n, entry in runner.runtime.loras.items()}
    row = {k: v[:1] for k, v in x.items()}
    pair = [Variant("bull", 0.4, "fire", 0.8)]
    assert float((runner(row, pair) - _baked(reference, pair, row)).abs().max()) < TOL
    assert fed.merges == 4  # the pair = the bull unit + the fire unit, both held
    runner.merged.keep_only({**keys, "fire": "re-registered"})  # what a re-registered LoRA merged is dropped
    assert {u[1] for u in fed.units} == {"watercolor", "bull"}  # (dog went first: 3 held, LRU)
    runner(row, pair)
    assert fed.merges == 5  # fire merged again from its (current) factors
    # one unit held: each merge of a call evicts the one before, whose arrays are written over only
    # from the next call on (spare memory), never while this call's rows still read them
    tight = UNetWeights(out, threads=1, merged_variants=0, fed_variants=1)
    for _ in range(2):
        assert float((tight(x, variants) - want).abs().max()) < TOL
    assert tight.merged.fed.merges == 8
    off = UNetWeights(out, threads=1, merged_variants=0, fed_variants=0)  # both off: the runtime network
    assert off.merged.fed is None
    assert float((off(x, variants) - want).abs().max()) < TOL


def test_fed_merges_overlap_the_other_rows_and_a_failed_one_is_not_held(runtime_repo, reference):
    """A new unit's merge runs on a worker while the call's other rows run (the W_init row first, the
    fed row once its weights are merged); a merge that fails fails its call and is not held, so the
    next call merges again."""
    from craft_serving.unet_weights import UNetWeights

    out, _ = runtime_repo
    x = {k: v[:2] for k, v in reference[3].items()}
    variants = [Variant("bull", 0.4), Variant()]
    want = _baked(reference, variants, x)
    runner = UNetWeights(out, threads=1, merged_variants=0)
    merged, events, fail = runner.merged, [], [True]
    fed_merge = merged._fed_merge

    def slow(name, kind, gate):
        names, merge = fed_merge(name, kind, gate)

        def run(spare):
            time.sleep(0.5)  # longer than the W_init row's call
            if fail[0]:
                fail[0] = False
                raise MemoryError("test: no memory for the merge")
            arrays = merge(spare)
            events.append("merged")
            return arrays
        return names, run

    merged._fed_merge = slow
    baked = runner.denoiser.baked

    def logged(variant):
        call = baked(variant)
        return (lambda inputs: events.append("W_init row") or call(inputs)) if variant.is_base else call

    runner.denoiser.baked = logged
    fail[0] = False
    runner(x, [Variant(style="fire", gamma_s=0.8), Variant()])  # W_init's and the fed session opened (> 0.5 s)
    fail[0] = True
    events.clear()
    with pytest.raises(MemoryError, match="no memory for the merge"):
        runner(x, variants)
    assert events == ["W_init row"] and [u[1] for u in merged.fed.units] == ["fire"]  # bull not held
    events.clear()
    got = runner(x, variants)
    assert float((got - want).abs().max()) < TOL
    assert events == ["W_init row", "merged"] and len(merged.fed.units) == 2 and merged.fed.merges == 3
    assert torch.equal(runner(x, variants), got) and merged.fed.merges == 3  # held now: no merge


def test_merges_run_numpy_blas_on_one_thread(runtime_repo):
    """A runner that merges puts numpy's BLAS on one thread for its process (a second one busy-waits on
    the core that the call beside a merge needs), also for merges on worker threads."""
    import threading

    import numpy as np
    from threadpoolctl import threadpool_info

    from craft_serving.merged_unet import merge_weights, weight_name
    from craft_serving.unet_weights import UNetWeights

    def blas():
        return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})

    assert blas(), "numpy has no BLAS that threadpoolctl sees"
    layout = UNetWeights(runtime_repo[0], threads=1).runtime.layout  # merging on (the defaults)
    assert blas() == [1]
    module = layout.modules[0]
    rng = np.random.default_rng(0)
    A = rng.standard_normal((2, int(np.prod(module.shape[1:]))), dtype=np.float32)
    B = rng.standard_normal((module.shape[0], 2), dtype=np.float32)
    name = weight_name(module.name)
    w0 = {name: np.ones(module.shape, np.float32)}
    seen, got = [], {}

    def spare(_name):
        seen.append(blas())
        return None

    worker = threading.Thread(target=lambda: got.update(merge_weights(layout, {module.name: [(0.5, A, B)]}, w0,
                                                                      spare)))
    worker.start()
    worker.join()
    assert seen == [[1]]
    assert np.allclose(got[name], (1 + 0.5 * B @ A).reshape(module.shape), atol=1e-5)


def test_background_merges_wait_for_a_quiet_runner(runtime_repo, reference):
    """A background build starts only once the runner had no call for ``merge_idle_ms``: while calls keep
    coming (here < 2 s apart) nothing is built and the rows run on the fed session; then it builds."""
    from craft_serving.unet_weights import UNetWeights

    out, _ = runtime_repo
    x = reference[3]
    variants = [Variant("bull", 0.4)] * 4
    runner = UNetWeights(out, threads=1, merge_after=1, merge_idle_ms=2000)
    want = _baked(reference, variants)
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        assert float((runner(x, variants) - want).abs().max()) < TOL
    assert runner.merged.built == 0 and list(runner.merged.pending) == [Variant("bull", 0.4)]
    runner.merged.wait()  # the runner is quiet now: the build runs
    assert runner.merged.built == 1 and Variant("bull", 0.4) in runner.merged.held
    with pytest.raises(ValueError, match=r"merge_idle_ms: must be an integer >= 0, got -1"):
        UNetWeights(out, threads=1, merge_idle_ms=-1)


def test_no_background_build_starts_during_a_long_call(runtime_repo, reference):
    """The quiet time counts from the end of the runner's last call: a call longer than
    ``merge_idle_ms`` (a full-size UNet on a CPU) is not a quiet moment for a build."""
    from craft_serving.unet_weights import UNetWeights

    out, _ = runtime_repo
    x = {k: v[:2] for k, v in reference[3].items()}
    variants = [Variant("bull", 0.4), Variant()]
    runner = UNetWeights(out, threads=1, merge_after=1, merge_idle_ms=100)
    runner({k: v[1:] for k, v in x.items()}, variants[1:])  # W_init's session opened
    events, merged = [], runner.merged
    build = merged._build
    merged._build = lambda *job: events.append("build") or build(*job)
    baked = runner.denoiser.baked

    def slow(variant):
        call = baked(variant)
        if not variant.is_base:
            return call

        def run(inputs):
            events.append("long call")
            time.sleep(0.6)  # six times merge_idle_ms
            events.append("long call over")
            return call(inputs)
        return run

    runner.denoiser.baked = slow
    got = runner(x, variants)  # the first call of bull@0.4 schedules its build (merge_after=1)
    merged.wait()
    assert events == ["long call", "long call over", "build"] and merged.built == 1
    assert float((got - _baked(reference, variants, x)).abs().max()) < TOL


def test_fed_graph_turns_initializers_into_inputs(runtime_repo):
    import onnx

    from craft_export.runtime_export import read_layout_files
    from craft_serving.fed_unet import fed_graph
    from craft_serving.merged_unet import weight_name

    out, _ = runtime_repo
    base = out / "unet_base" / "1" / "model.onnx"
    name = weight_name(read_layout_files(out / "unet_lora")[0].modules[0].name)
    graph = onnx.load_from_string(fed_graph(base, {name})).graph
    assert name in {i.name for i in graph.input} and name not in {t.name for t in graph.initializer}
    with pytest.raises(ValueError, match="no initializer named 'nope'"):
        fed_graph(base, {"nope"})


def test_a_failed_merge_is_retried_then_given_up(runtime_repo, reference, monkeypatch):
    """A merge whose build fails (say, out of memory) leaves its rows on the runtime network - the call
    still answers - and is tried again ``merge_after * 8**k`` calls later; after ``BUILD_TRIES`` failures
    the variant is not tried again."""
    from craft_serving import merged_unet
    from craft_serving.unet_weights import UNetWeights

    out, _ = runtime_repo
    x = reference[3]
    real, attempts = merged_unet.OrtSession, []

    def flaky(*args, **kwargs):
        attempts.append(1)
        if fail[0] > 0:
            fail[0] -= 1
            raise RuntimeError("injected: out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(merged_unet, "OrtSession", flaky)
    monkeypatch.setattr(merged_unet, "BUILD_TRIES", 2)
    fail = [1]
    v = Variant("bull", 0.4)
    rows = [v] * int(x["sample"].shape[0])
    want = _baked(reference, rows)
    runner = UNetWeights(out, threads=1, merge_after=1, merge_background=False)
    assert float((runner(x, rows) - want).abs().max()) < TOL  # the build failed; the fed session answered
    assert runner.merged.failures == {v: 1} and not runner.merged.held and len(attempts) == 1
    for _ in range(7):  # retried on the 8th call from the failure (merge_after * 8)
        runner(x, rows)
    assert len(attempts) == 1
    assert float((runner(x, rows) - want).abs().max()) < TOL
    assert len(attempts) == 2 and runner.merged.built == 1 and v in runner.merged.held
    # a variant that keeps failing: BUILD_TRIES (2 here) builds, then never again
    fail[0], w = 99, Variant("bull", 0.5)
    rows = [w] * len(rows)
    for _ in range(20):
        runner(x, rows)
    assert len(attempts) == 4 and w in runner.merged.blocked and w not in runner.merged.held


@pytest.mark.extended
def test_merged_variants_capacity_switch_and_worker_thread(runtime_repo, reference):
    """At most ``merged_variants`` held (LRU), 0 turns merging off, bad settings are refused by name, and
    by default the merge is built on a worker thread while the calls go on on the runtime network."""
    from craft_serving.unet_weights import UNetWeights

    out, _ = runtime_repo
    x = reference[3]
    variants = [Variant("dog", 1.0, "watercolor", 0.7), Variant(), Variant("bull", 0.4), Variant(style="fire", gamma_s=0.8)]
    want = _baked(reference, variants)
    small = UNetWeights(out, threads=1, merged_variants=1, merge_after=1, merge_background=False)
    got = small(x, variants)
    assert len(small.merged.held) == 1 and small.merged.built == 3
    assert float((got - want).abs().max()) < TOL
    off = UNetWeights(out, threads=1, merged_variants=0)
    off(x, variants), off(x, variants)
    assert off.merged.built == 0
    with pytest.raises(ValueError, match=r"merge_after: must be an integer >= 1, got 0"):
        UNetWeights(out, threads=1, merge_after=0)
    background = UNetWeights(out, threads=1)
    background(x, variants)
    assert float((background(x, variants) - want).abs().max()) < TOL  # builds started, rows still on the runtime net
    background.merged.wait()
    assert set(background.merged.held) == {v for v in variants if not v.is_base} and not background.merged.pending
    assert float((background(x, variants) - want).abs().max()) < TOL  # now on the merged sessions
