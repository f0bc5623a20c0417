"""``craft export``: recipe -> baked UNet variants -> ONNX (-> TensorRT) -> Triton model repository.

Order of work (nothing in REPO changes before step 5):
1. validate the recipe, the base, every LoRA and the runtime;
2. plan the models (text encoder(s), VAE decoder, UNet variants) with content keys;
3. compare with the repository's manifest: unchanged models are reused;
4. build each new model in ``REPO/.craft-staging`` (export, parity check, config.pbtxt;
   :mod:`.model_build`), then the pipeline models, their assets and the new manifest;
5. commit (:class:`.staging.RepoTransaction`): rename the new models into place, swap
   ``manifest.json`` last, then retire the models nothing refers to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from craft_ops.aggregate import Variant

from .bake import VariantBaker
from .loading import PipelineParts, sha256_file, unet_weights
from .lora_register import register_fast
from .memory import phase, track_phases
from .manifest_schema import EngineInfo, LoraRecord, manifest_json, variant_record
from .model_build import ExportWeights, adopt_weights, build_model, engine_path
from .network_specs import network_specs
from .networks import PipelineNets, pipeline_nets
from .options import ExportError, ExportOptions, ExportReport, ModelJob
from .plan import FORMAT_VERSION, parse_pairs, plan_variants, stable_hash, variant_key, variant_model_name
from .recipe import EngineRange, Recipe, load_confined_recipe
from .recipe_models import LoadedLora, RecipeModels, load_recipe_models
from .repo_files import stage_pipeline
from .runtime_plan import RuntimeSide, plan_runtime_variants, runtime_side
from .unet_runner import UNET_MODEL, UNET_RUNNER, runner_key, served_by_runner
from .staging import RepoTransaction, describe_failure, existing_manifest, folder_key

log = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportOptions", "ExportReport", "ModelJob", "export_repository", "export_networks",
           "plan_jobs"]


# -- 1. validation -------------------------------------------------------------------------------


@dataclass
class Loaded:
    """Everything one export works from, loaded and checked."""

    models: RecipeModels
    lora_files: dict[str, dict]  # name -> path, sha256, format, rank
    pairs: list[tuple[str, str]]
    engine: EngineRange
    nets: PipelineNets
    baker: VariantBaker
    runtime: RuntimeSide | None = None  # --lora-mode runtime: layout, checked factors, fingerprint

    @property
    def recipe(self) -> Recipe:
        return self.models.recipe

    @property
    def parts(self) -> PipelineParts:
        return self.models.parts

    @property
    def loras(self) -> dict[str, LoadedLora]:
        return self.models.loras


def load_everything(options: ExportOptions) -> Loaded:
    recipe = load_confined_recipe(options.recipe, options.confine_to)
    models = load_recipe_models(recipe)
    files = {name: {"path": str(spec.path), "sha256": sha256_file(spec.path), "format": models.loras[name].adapter.format,
                    "rank": models.loras[name].adapter.rank}
             for name, spec in ((s.name, s) for s in models.recipe.loras)}
    pairs = parse_pairs(options.pairs, {n: lora.kind for n, lora in models.loras.items()})
    baker = VariantBaker(unet_weights(models.parts.unet), models.shapes, models.recipe.routing, models.loras.values())
    runtime = runtime_side(models, files, options, pairs) if options.lora_mode == "runtime" else None  # refusals named
    return Loaded(models, files, pairs, models.recipe.engine_range(models.parts.arch), pipeline_nets(models.parts),
                  baker, runtime)


# -- 2. planning -------------------------------------------------------------------------------


def _weights_key(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return stable_hash([(p.name, sha256_file(p)) for p in files])


def plan_jobs(loaded: Loaded, build: Mapping[str, object]) -> list[ModelJob]:
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
    routed = {n: loaded.baker.routed_modules(n) for n in loaded.loras}  # Eq. 7, without the fp32 deltas
    kinds = {n: lora.kind for n, lora in loaded.loras.items()}
    gammas = {n: lora.gammas for n, lora in loaded.loras.items()}
    if loaded.runtime is None:
        variants = plan_variants(kinds, gammas, loaded.pairs)
    else:  # W_init and the hot pairs only; every LoRA runs on the runtime network
        variants = plan_runtime_variants(kinds, gammas, loaded.pairs)
        jobs.append(ModelJob(loaded.runtime.model, loaded.runtime.model,
                             loaded.runtime.network_key(w_init, build), ()))
    by_key: dict[str, list[Variant]] = {}
    for v in variants:
        by_key.setdefault(variant_key(v, w_init, lora_keys, routed, build), []).append(v)
    for key, vs in by_key.items():
        jobs.append(ModelJob(variant_model_name(vs[0]), "unet", key, tuple(vs)))
    if served_by_runner(build):  # one Triton model serves every UNet weight set (:mod:`.unet_runner`)
        jobs.append(ModelJob(UNET_MODEL, UNET_RUNNER, runner_key(build)))
    return jobs


def _detect_runner(options: ExportOptions) -> str:
    if options.runner != "auto":
        return options.runner
    from .triton_locate import TritonServerError, find_tritonserver, has_native_backend

    try:
        binary = find_tritonserver()
    except TritonServerError:
        return "native"  # no local server: the repository is for the NGC container
    return "native" if has_native_backend(binary, "tensorrt" if options.runtime == "tensorrt" else "onnxruntime") \
        else "python"


# -- 5. the manifest -------------------------------------------------------------------------------


def _manifest(loaded: Loaded, jobs: list[ModelJob], records: Mapping[str, dict], assets: Mapping[str, str],
              options: ExportOptions, runner: str) -> dict:
    parts, routing, engine = loaded.parts, loaded.recipe.routing, loaded.engine
    loras = []
    for name, lora in loaded.loras.items():
        modules = list(lora.adapter.modules)
        coverage = {"modules": len(modules), "content": len(routing.select("content", modules)),
                    "style": len(routing.select("style", modules)), "routed": len(routing.select(lora.kind, modules))}
        files = loaded.lora_files[name]
        factors = loaded.runtime.records.get(name, {}) if loaded.runtime else {}
        loras.append(LoraRecord(name, lora.kind, tuple(lora.gammas), files["path"], files["sha256"], files["format"],
                                files["rank"], coverage, factors.get("factors", ""), factors.get("factors_key", "")))
    return manifest_json(
        arch=parts.arch, base=parts.path, backbone=loaded.recipe.backbone, routing=routing,
        runtime=options.runtime, precision=options.precision, runner=runner,
        latent_scale=parts.latent_scale, latent_channels=int(parts.unet.config.in_channels),
        loras=loras, pairs=loaded.pairs, variants=[variant_record(v, j.name) for j in jobs for v in j.variants],
        networks={("unet" if j.network == UNET_RUNNER else j.name): j.name for j in jobs
                  if j.network not in ("unet", "unet_lora")},
        models={j.name: records[j.name] for j in jobs},
        assets=assets, defaults=loaded.recipe.defaults(parts.arch),
        engine=EngineInfo(engine.min_size, engine.opt_size, engine.max_size, engine.max_batch,
                          max_pixels=engine.max_pixels),
        force_zeros_for_empty_prompt=bool(parts.extra.get("force_zeros_for_empty_prompt", False)),
        lora_mode=options.lora_mode, runtime_lora=loaded.runtime.manifest_section() if loaded.runtime else None,
    )


# -- the whole export --------------------------------------------------------------------------------


def export_repository(options: ExportOptions, progress: Callable[[str], None] = lambda msg: None) -> ExportReport:
    """Run an export (see module docstring); returns what was built, reused and removed."""
    t_start = time.perf_counter()
    # 1. validate --out and the runtime; only runtime LoRAs changed: factor files + manifest, no base loaded
    report = register_fast(options, progress)
    if report is not None:
        return report
    return export_networks(options, progress, t_start)


def export_networks(options: ExportOptions, progress: Callable[[str], None] = lambda msg: None,
                    t_start: float | None = None) -> ExportReport:
    """The export past :func:`~craft_export.lora_register.register_fast` (which checked --out and the
    runtime, and found that networks must be built): load, plan, build, commit."""
    t_start = time.perf_counter() if t_start is None else t_start
    out = Path(options.out).resolve()
    runner = _detect_runner(options)
    if options.lora_mode == "runtime" and runner == "native":
        raise ExportError("--runner: --lora-mode runtime is served by the Python UNet runner only (the native "
                          "onnxruntime / tensorrt_plan backends cannot pick LoRA factors per sample); "
                          "use --runner python (got 'native')")
    with track_phases(options.memory_phases) as peaks:
        with phase("load"):
            loaded = load_everything(options)
        # 2.-5. in REPO/.craft-staging, committed with renames (:mod:`.staging`)
        txn = RepoTransaction(out)
        try:
            with txn:
                report = _export_into(txn, loaded, runner, options, progress)
        except OSError as exc:  # a full disk, a read-only volume: say so, without a traceback
            raise ExportError(describe_failure(out, exc, txn.committing)) from exc
    if peaks is not None:
        report.memory = peaks.summary()
    report.seconds = time.perf_counter() - t_start
    return report


def _reusable(out: Path, job: ModelJob, prev: Mapping | None, build: Mapping[str, object]) -> bool:
    """An unchanged model: same content key in the old manifest and in the folder itself."""
    folder = out / job.name
    # the runtime network, and UNet weights served by the one UNet model, are not Triton models
    weights_only = job.network == "unet_lora" or (job.network == "unet" and served_by_runner(build))
    weights_file = "model.plan" if build.get("runtime") == "tensorrt" else "model.onnx"
    marker = folder / "1" / weights_file if weights_only else folder / "config.pbtxt"
    if not prev or prev.get("key") != job.key or not marker.is_file():
        return False
    return folder_key(folder) in (None, job.key)  # no key file: exported before key files existed


def _export_into(txn: RepoTransaction, loaded: Loaded, runner: str, options: ExportOptions,
                 progress: Callable[[str], None]) -> ExportReport:
    out, staging, report = txn.out, txn.models, ExportReport()
    old = existing_manifest(out) or {}  # read again under the lock
    specs = network_specs(loaded.parts.arch, loaded.parts, max_batch=loaded.engine.max_batch)
    if loaded.runtime is not None:
        specs[loaded.runtime.model] = loaded.runtime.spec(specs["unet"])
    e = loaded.engine
    build = {"runtime": options.runtime, "precision": options.precision, "runner": runner,
             "engine": [e.min_size, e.opt_size, e.max_size, e.max_batch]}
    if options.runtime == "tensorrt":  # engines built under an older policy are rebuilt, not reused
        from .trt_policy import POLICY_VERSION

        build["trt_policy"] = POLICY_VERSION
        build["lora_mode"] = options.lora_mode  # runtime mode: every UNet served by the one runner model
    # 2. plan
    jobs = plan_jobs(loaded, build)
    old_models = old.get("models", {})
    # 3./4. build what changed, in the staging folder
    records, fresh = {}, []
    # the W_init UNet, built now or reused: variants are derived (ONNX) and refitted (TensorRT) from it
    base_onnx: Path | None = None
    base_engine: Path | None = None
    weights = ExportWeights()  # each network's weights held once: by PyTorch or by ONNX Runtime
    reusable = {job.name: _reusable(out, job, old_models.get(job.name), build) for job in jobs}
    for i, job in enumerate(jobs, 1):
        prev = old_models.get(job.name)
        if reusable[job.name]:
            records[job.name] = prev
            report.reused.append(job.name)
            if not all(reusable.values()) and (out / job.name / "1" / "model.onnx").is_file():
                adopt_weights(job, loaded.nets, loaded.baker, out / job.name / "1" / "model.onnx", weights)
            if job.is_base_unet:
                base_onnx = out / job.name / "1" / "model.onnx"
                base_engine = engine_path(out / job.name, options)
            continue
        progress(f"[{i}/{len(jobs)}] baking + exporting {job.name}")
        t0 = time.perf_counter()
        with phase(job.name):
            records[job.name] = build_model(job, loaded.nets, loaded.baker, loaded.engine, options, runner, staging,
                                            specs, base_onnx, base_engine, weights)
        txn.mark(job.name, job.key)
        fresh.append(job.name)
        if job.is_base_unet:
            base_onnx = staging / job.name / "1" / "model.onnx"
            base_engine = engine_path(staging / job.name, options)
        report.timings[job.name] = round(time.perf_counter() - t0, 3)
    with phase("pipeline"):
        pipeline, assets = stage_pipeline(staging, loaded.parts)
    if loaded.runtime is not None:  # factor files: into the new network's folder, or beside the reused one
        model = loaded.runtime.model
        report.loras = loaded.runtime.write_factors(staging / model if model in fresh else out / model)
    # 5. every model built and checked, the manifest written: only now does REPO change
    manifest = _manifest(loaded, jobs, records, assets, options, runner)
    keep = {j.name for j in jobs} | set(pipeline)
    report.removed = sorted(set(old_models) - keep)
    txn.commit([*fresh, *pipeline], manifest, remove=report.removed)
    if loaded.runtime is not None:
        loaded.runtime.remove_unreferenced(out)
    report.built = fresh
    return report
