"""``craft export``: recipe -> baked UNet variants -> ONNX (-> TensorRT) -> Triton model repository.

Order of work (nothing in REPO changes before step 4):
1. validate the recipe, the base, every LoRA and the runtime;
2. plan the models (text encoder(s), VAE decoder, UNet variants) with content keys;
3. compare with the repository's manifest: unchanged models are reused;
4. build each new model in a staging folder beside REPO (export, parity check, config.pbtxt) and
   rename it into place; refresh the pipeline models and assets;
5. swap ``manifest.json`` atomically, then delete the models nothing refers to.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from craft_ops.aggregate import Variant
from craft_ops.routing import RoutingError

from .loading import LoadError, PipelineParts, load_lora, load_pipeline_parts, sha256_file, unet_module_shapes
from craft_serving.manifest import MANIFEST, write_json_atomic
from .plan import FORMAT_VERSION, parse_pairs, plan_variants, stable_hash, variant_key, variant_model_name
from .recipe import EngineRange, Recipe, RecipeError, load_recipe
from craft_reference.pipeline import LoadedLora, ReferencePipeline

log = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportOptions", "ModelJob", "export_repository", "run_export_cli"]

STAGING = ".craft-staging"
PIPELINE_MODELS = ("craft_pipeline", "craft_pipeline_stream", "craft_catalog")
ASSETS_MODEL = "craft_pipeline"


class ExportError(ValueError):
    """An export that cannot proceed; nothing in the repository was changed."""


@dataclass(frozen=True)
class ExportOptions:
    recipe: Path
    out: Path
    runtime: str = "onnxruntime"  # or "tensorrt"
    precision: str = "fp32"
    pairs: str = "all"
    runner: str = "auto"  # "native" | "python" | "auto"
    # TensorRT: keep the UNet variants' ONNX files after their engines are built and checked. By
    # default only W_init's stays (later variants are derived from it): a full-size SDXL variant
    # is 10 GB of fp32 ONNX that nothing serves.
    keep_onnx: bool = False

    def __post_init__(self) -> None:
        if self.runtime not in ("onnxruntime", "tensorrt"):
            raise ExportError(f"--runtime must be onnxruntime or tensorrt, got {self.runtime!r}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ExportError(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.runner not in ("auto", "native", "python"):
            raise ExportError(f"--runner must be auto, native or python, got {self.runner!r}")


@dataclass(frozen=True)
class ModelJob:
    """One Triton model to have in the repository."""

    name: str
    network: str  # "unet" | "text_encoder" | "text_encoder_2" | "vae_decoder"
    key: str
    variants: tuple[Variant, ...] = ()


@dataclass
class ExportReport:
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"built": self.built, "reused": self.reused, "removed": self.removed, "seconds": round(self.seconds, 3)}


# -- 1. validation -------------------------------------------------------------------------------


@dataclass
class Loaded:
    recipe: Recipe
    parts: PipelineParts
    loras: dict[str, LoadedLora]
    lora_files: dict[str, dict]
    pairs: list[tuple[str, str]]
    engine: EngineRange


def _check_runtime(options: ExportOptions) -> None:
    if options.runtime != "tensorrt":
        if options.precision != "fp32":
            log.warning("--precision %s with onnxruntime on CPU: exporting fp32 weights (DESIGN-NOTES 9)", options.precision)
        return
    from .tensorrt_build import check_tensorrt_available

    check_tensorrt_available()


def _check_out(out: Path) -> dict | None:
    """The existing manifest, or None for a new/empty folder; refuse foreign non-empty folders."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text())
        except json.JSONDecodeError as exc:
            raise ExportError(f"{manifest}: unreadable manifest ({exc}); remove the folder to start afresh") from exc
    if any(out.iterdir()):
        raise ExportError(f"--out {out} is not empty and holds no {MANIFEST}: refusing to write into it")
    return None


def load_everything(options: ExportOptions) -> Loaded:
    recipe = load_recipe(options.recipe)
    parts = load_pipeline_parts(recipe.base, backbone=recipe.backbone)
    shapes = unet_module_shapes(parts.unet)
    try:
        recipe.routing.check_against(list(shapes))
    except RoutingError as exc:
        raise ExportError(f"{recipe.path}: base.routing: {exc}") from exc
    loras, files = {}, {}
    for spec in recipe.loras:
        adapter, metadata = load_lora(spec.path, shapes, name=spec.name)
        declared = metadata.get("craft.kind")
        if declared and declared != spec.kind:
            log.warning("LoRA %s is declared %s in its metadata but %s in the recipe", spec.name, declared, spec.kind)
        loras[spec.name] = LoadedLora(spec.name, spec.kind, adapter, spec.gammas)
        files[spec.name] = {"path": str(spec.path), "sha256": sha256_file(spec.path), "format": adapter.format,
                            "rank": adapter.rank}
    pairs = parse_pairs(options.pairs, {n: l.kind for n, l in loras.items()})
    return Loaded(recipe, parts, loras, files, pairs, recipe.engine_range(parts.arch))


# -- 2. planning -------------------------------------------------------------------------------


def _weights_key(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return stable_hash([(p.name, sha256_file(p)) for p in files])


def plan_jobs(loaded: Loaded, pipe: ReferencePipeline, build: Mapping[str, object]) -> list[ModelJob]:
    parts = loaded.parts
    unet_dir = (loaded.recipe.backbone or parts.path)
    unet_dir = unet_dir / "unet" if (unet_dir / "unet").is_dir() else unet_dir
    jobs = []
    te_names = ["text_encoder", "text_encoder_2"] if parts.arch == "sdxl" else ["text_encoder"]
    for name in te_names + ["vae_decoder"]:
        folder = parts.path / ("vae" if name == "vae_decoder" else name)
        key = stable_hash({"v": FORMAT_VERSION, "network": name, "weights": _weights_key(folder), "build": dict(build)})
        jobs.append(ModelJob(name, name, key))
    w_init = _weights_key(unet_dir)
    lora_keys = {n: f["sha256"] for n, f in loaded.lora_files.items()}
    # the names routed_deltas would key (Eq. 7), without computing the fp32 deltas themselves
    routed = {n: sorted(pipe.routing.select(l.kind, l.adapter.modules)) for n, l in loaded.loras.items()}
    variants = plan_variants({n: l.kind for n, l in loaded.loras.items()},
                             {n: l.gammas for n, l in loaded.loras.items()}, loaded.pairs)
    by_key: dict[str, list[Variant]] = {}
    for v in variants:
        by_key.setdefault(variant_key(v, w_init, lora_keys, routed, build), []).append(v)
    for key, vs in by_key.items():
        jobs.append(ModelJob(variant_model_name(vs[0]), "unet", key, tuple(vs)))
    return jobs


# -- 3./4. building ------------------------------------------------------------------------------


def _network_module(pipe: ReferencePipeline, job: ModelJob) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The nn.Module to export for a job and its parameter overrides (baked variant weights)."""
    if job.network == "unet":
        return pipe.unet, pipe.params_for(job.variants[0], cache=False)  # baked once: not kept
    if job.network == "vae_decoder":
        return pipe.vae, {}
    return pipe.text_encoders[0 if job.network == "text_encoder" else 1], {}


class _Baked(torch.nn.Module):
    """A network with some parameters replaced (``functional_call``): no copy, the module is untouched."""

    def __init__(self, module: torch.nn.Module, params: Mapping[str, torch.Tensor]):
        super().__init__()
        self.inner = module
        self.params = dict(params)

    @property
    def overrides(self) -> dict[str, torch.Tensor]:
        """The replaced parameters under their names in this module's graph (``inner.`` prefix)."""
        return {f"inner.{k}": v for k, v in self.params.items()}

    def forward(self, *args, **kwargs):
        if not self.params:
            return self.inner(*args, **kwargs)
        return torch.func.functional_call(self.inner, self.params, args, kwargs, strict=False)


# Max |ONNX Runtime - PyTorch| accepted per network in fp32 (measured 1-6e-6 on the tiny models).
PARITY_TOLERANCE = {"unet": 1e-4, "text_encoder": 1e-4, "text_encoder_2": 1e-4, "vae_decoder": 1e-4}


def _parity_inputs(spec, engine: EngineRange) -> list[dict[str, torch.Tensor]]:
    """Seeded inputs at two batch sizes and two image sizes of the engine range."""
    from .onnx_export import example_inputs

    lo = engine.min_size
    wide = min(engine.max_size, (lo * 3 // 2) // 8 * 8)
    return [example_inputs(spec, hw=(lo, lo), batch=1, seed=1), example_inputs(spec, hw=(lo, wide), batch=2, seed=2)]


def build_model(job: ModelJob, pipe: ReferencePipeline, loaded: Loaded, options: ExportOptions, runner: str,
                staging: Path, specs, base_onnx: Path | None = None, base_engine: Path | None = None) -> dict:
    """Export one model into ``staging/<name>``, check it against PyTorch, return its manifest record.

    A UNet variant is derived from the W_init graph ``base_onnx`` by replacing the weights
    it changes (see :mod:`.onnx_variants`); everything else is traced and exported. With
    ``--runtime tensorrt`` a UNet variant's engine is the W_init engine ``base_engine``
    (a ``model.plan``) refitted, when there is one.
    """
    from .onnx_export import example_inputs, export_onnx, run_parity
    from .onnx_variants import derive_variant

    spec = specs[job.network]
    module, params = _network_module(pipe, job)
    net = _Baked(module, params).eval()
    target = staging / job.name
    shutil.rmtree(target, ignore_errors=True)
    (target / "1").mkdir(parents=True)
    onnx_path = target / "1" / "model.onnx"
    size = loaded.engine.min_size
    t0 = time.perf_counter()
    if base_onnx is not None and params:
        derive_variant(base_onnx, net.overrides, onnx_path)
        how = "derived"
    else:
        export_onnx(net, spec, example_inputs(spec, hw=(size, size), batch=2, seed=0), onnx_path)
        how = "traced"
    seconds = time.perf_counter() - t0
    report = run_parity(net, onnx_path, spec, _parity_inputs(spec, loaded.engine))
    tolerance = PARITY_TOLERANCE[job.network]
    if report["worst_abs_err"] > tolerance:
        raise ExportError(f"{job.name}: ONNX Runtime differs from PyTorch by {report['worst_abs_err']:.3g} "
                          f"> tolerance {tolerance:g}")
    record = {"network": job.network, "key": job.key, "export_seconds": round(seconds, 3), "export": how,
              "parity_max_abs_err": report["max_abs_err"], "parity_tolerance": tolerance}
    if options.runtime == "tensorrt":
        from .tensorrt_build import build_engine

        from .specs import ImageRange

        e = loaded.engine
        image_range = ImageRange((e.min_size,) * 2, (e.opt_size,) * 2, (e.max_size,) * 2)
        refit_from = None
        if job.network == "unet" and not job.variants[0].is_base and base_engine is not None:
            refit_from = base_engine.read_bytes()
        record.update(build_engine(job, onnx_path, spec, options, target / "1", image_range=image_range,
                                   base_engine=refit_from))
        if job.network == "unet" and not job.variants[0].is_base and not options.keep_onnx:
            for f in onnx_path.parent.glob("model.onnx*"):  # the graph and its external data
                f.unlink()
            record["onnx_removed"] = True
    _write_model_config(job, spec, target, runner, options, loaded)
    return record


def _write_model_config(job: ModelJob, spec, target: Path, runner: str, options: ExportOptions, loaded: Loaded) -> None:
    from .specs import config_pbtxt

    if options.runtime == "tensorrt":
        platform = "tensorrt_plan" if runner == "native" else "python"
    else:
        platform = "onnxruntime" if runner == "native" else "python"
    parameters = {"craft_runtime": options.runtime, "craft_network": job.network}
    if platform == "python" and options.runtime == "tensorrt":
        # GPU-resident inputs stay on the GPU; torch tensors in and out through DLPack (EngineModel)
        parameters.update(craft_io="dlpack", FORCE_CPU_ONLY_INPUT_TENSORS="no")
    # UNet models batch whatever is already queued but never wait for more: a 2 ms window cost
    # 2.2 ms per call serially and bought no throughput on CPU (benchmarks/results/serve-*).
    text = config_pbtxt(job.name, spec, platform=platform, max_batch_size=loaded.engine.max_batch,
                        instance_kind="KIND_GPU" if options.runtime == "tensorrt" else "KIND_CPU",
                        dynamic_batching=job.network == "unet", max_queue_delay_us=0 if job.network == "unet" else None,
                        parameters=parameters)
    (target / "config.pbtxt").write_text(text)
    if platform == "python":
        shutil.copy(_templates() / "engine_runner" / "model.py", target / "1" / "model.py")


def _templates() -> Path:
    """The repository's ``model_repository/`` folder (installed as package data)."""
    from importlib.resources import files

    return Path(str(files("craft_model_repository")))


def _detect_runner(options: ExportOptions) -> str:
    if options.runner != "auto":
        return options.runner
    from craft_serving.triton_server import TritonServerError, find_tritonserver

    try:
        binary = find_tritonserver()
    except TritonServerError:
        return "native"  # no local server: the repository is for the NGC container
    backend = "tensorrt" if options.runtime == "tensorrt" else "onnxruntime"
    backends = binary.parent.parent / "backends"
    return "native" if (backends / backend).is_dir() else "python"


def _install_pipeline(out: Path, staging: Path, loaded: Loaded) -> dict[str, str]:
    """Copy the pipeline models, with the tokenizer(s) and scheduler config inside ``craft_pipeline/assets``.

    (Every top-level folder of a Triton repository is a model, so the assets live inside one.)
    """
    parts = loaded.parts
    for name in PIPELINE_MODELS:
        stage = staging / name
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(_templates() / name, stage, ignore=shutil.ignore_patterns("__pycache__"))
        if name == ASSETS_MODEL:
            assets = _copy_assets(parts, stage / "assets")
        _swap_in(stage, out / name)
    return {k: f"{ASSETS_MODEL}/assets/{v}" for k, v in assets.items()}


def _copy_assets(parts: PipelineParts, folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    assets = {}
    for name in (["tokenizer", "tokenizer_2"] if parts.arch == "sdxl" else ["tokenizer"]):
        shutil.copytree(parts.path / name, folder / name)
        assets[name] = name
    shutil.copy(parts.path / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")
    assets["scheduler_config"] = "scheduler_config.json"
    return assets


def _swap_in(stage: Path, dest: Path) -> None:
    """Move a finished folder into place; an older one is moved aside first, then deleted."""
    old = dest.with_name(f".old-{dest.name}")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(stage, dest)
    shutil.rmtree(old, ignore_errors=True)


# -- the whole export --------------------------------------------------------------------------------


def _manifest(loaded: Loaded, pipe: ReferencePipeline, jobs: list[ModelJob], records: Mapping[str, dict],
              assets: Mapping[str, str], options: ExportOptions, runner: str) -> dict:
    parts = loaded.parts
    defaults = loaded.recipe.defaults(parts.arch)
    engine = loaded.engine
    loras = []
    for name, lora in loaded.loras.items():
        modules = list(lora.adapter.modules)
        loras.append({
            "name": name, "kind": lora.kind, "gammas": list(lora.gammas), **loaded.lora_files[name],
            "coverage": {"modules": len(modules), "content": len(pipe.routing.select("content", modules)),
                         "style": len(pipe.routing.select("style", modules)),
                         "routed": len(pipe.routing.select(lora.kind, modules))},
        })
    variants = [{"content": v.content, "gamma_c": v.gamma_c, "style": v.style, "gamma_s": v.gamma_s, "model": j.name}
                for j in jobs for v in j.variants]
    return {
        "format_version": FORMAT_VERSION,
        "arch": parts.arch,
        "base": str(parts.path),
        "backbone": str(loaded.recipe.backbone) if loaded.recipe.backbone else None,
        "routing": pipe.routing.as_dict(),
        "runtime": options.runtime, "precision": options.precision, "runner": runner,
        "latent_scale": parts.latent_scale, "latent_channels": int(parts.unet.config.in_channels),
        "loras": loras,
        "pairs": [list(p) for p in loaded.pairs],
        "variants": variants,
        "networks": {j.name: j.name for j in jobs if j.network != "unet"},
        "models": {j.name: records[j.name] for j in jobs},
        "assets": dict(assets),
        "defaults": defaults.as_dict(),
        "engine": {"min_size": engine.min_size, "opt_size": engine.opt_size, "max_size": engine.max_size,
                   "max_batch": engine.max_batch, "multiple": 8},
    }


def _engine_path(model_dir: Path, options: ExportOptions) -> Path | None:
    """A model folder's TensorRT engine, when exporting for TensorRT and the engine is there."""
    if options.runtime != "tensorrt":
        return None
    from .tensorrt_build import ENGINE_FILE

    path = model_dir / "1" / ENGINE_FILE
    return path if path.is_file() else None


def export_repository(options: ExportOptions, progress: Callable[[str], None] = lambda msg: None) -> ExportReport:
    """Run an export (see module docstring); returns what was built, reused and removed."""
    t_start = time.perf_counter()
    report = ExportReport()
    out = Path(options.out).resolve()
    # 1. validate everything before writing anything
    old = _check_out(out)
    _check_runtime(options)
    loaded = load_everything(options)
    runner = _detect_runner(options)
    pipe = ReferencePipeline(loaded.parts, loaded.recipe.routing, list(loaded.loras.values()))
    from .specs import network_specs

    specs = network_specs(loaded.parts.arch, loaded.parts, max_batch=loaded.engine.max_batch)
    build = {"runtime": options.runtime, "precision": options.precision, "runner": runner,
             "engine": [loaded.engine.min_size, loaded.engine.opt_size, loaded.engine.max_size, loaded.engine.max_batch]}
    # 2. plan
    jobs = plan_jobs(loaded, pipe, build)
    old_models = (old or {}).get("models", {})
    # 3./4. build what changed, in a staging folder beside REPO (same file system: renames are atomic)
    staging = out.parent / f".{out.name}{STAGING}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    records, fresh = {}, []
    # the W_init UNet, built now or reused: variants are derived (ONNX) and refitted (TensorRT) from it
    base_onnx: Path | None = None
    base_engine: Path | None = None
    try:
        for i, job in enumerate(jobs, 1):
            prev = old_models.get(job.name)
            is_base_unet = job.network == "unet" and job.variants[0].is_base
            if prev and prev.get("key") == job.key and (out / job.name / "config.pbtxt").is_file():
                records[job.name] = prev
                report.reused.append(job.name)
                if is_base_unet:
                    base_onnx = out / job.name / "1" / "model.onnx"
                    base_engine = _engine_path(out / job.name, options)
                continue
            progress(f"[{i}/{len(jobs)}] baking + exporting {job.name}")
            t0 = time.perf_counter()
            records[job.name] = build_model(job, pipe, loaded, options, runner, staging, specs, base_onnx, base_engine)
            fresh.append(job.name)
            if is_base_unet:
                base_onnx = staging / job.name / "1" / "model.onnx"
                base_engine = _engine_path(staging / job.name, options)
            report.timings[job.name] = round(time.perf_counter() - t0, 3)
        # every model built and checked: only now does REPO change
        out.mkdir(parents=True, exist_ok=True)
        for name in fresh:
            _swap_in(staging / name, out / name)
        report.built = fresh
        assets = _install_pipeline(out, staging, loaded)
        # 5. manifest swap, then cleanup
        write_json_atomic(out / MANIFEST, _manifest(loaded, pipe, jobs, records, assets, options, runner))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    keep = {j.name for j in jobs}
    for name in sorted(set(old_models) - keep):
        shutil.rmtree(out / name, ignore_errors=True)
        report.removed.append(name)
    report.seconds = time.perf_counter() - t_start
    return report


def run_export_cli(args: argparse.Namespace) -> int:
    options = ExportOptions(recipe=Path(args.recipe), out=Path(args.out), runtime=args.runtime,
                            precision=args.precision, pairs=args.pairs, runner=args.runner,
                            keep_onnx=args.keep_onnx)
    say = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        report = export_repository(options, progress=say)
    except (RecipeError, LoadError) as exc:
        raise ExportError(str(exc)) from exc
    if args.json:
        print(json.dumps(report.summary()))
    else:
        print(f"built {len(report.built)}, reused {len(report.reused)}, removed {len(report.removed)} models "
              f"in {report.seconds:.1f} s -> {options.out}")
        for name, seconds in report.timings.items():
            print(f"  {name}: {seconds:.2f} s")
    return 0
