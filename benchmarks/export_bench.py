"""Export timings: full ``craft export`` vs re-export after adding one LoRA (+ TensorRT build vs refit on GPU).

CPU part (always runs; tiny demo models from ``craft_reference.demo``, ONNX Runtime repositories,
``runner="python"`` as in the serving tests):

* full export of the tiny SD 1.5 recipe (4 LoRAs -> 2 networks + 9 UNet variants = 11 models)
  and of the tiny SDXL recipe (3 networks + 9 UNet variants = 12 models), each into a fresh
  folder, median of ``--repeats`` runs;
* incremental: export the SD 1.5 recipe without ``fire`` (8 models), then add ``fire`` to the
  recipe and export into the same folder: the seconds of that second export, what it built /
  reused, and the ratio incremental / full.

GPU part (only when ``torch.cuda.is_available()`` and ``import tensorrt`` work; otherwise the
result says ``"skipped: ..."``). UNTESTED on this project's CPU machines - written against
``craft_export.tensorrt_build.EngineBuild`` (TensorRT 10 API): a full-size SDXL UNet
(public config from REFERENCE-ARCHITECTURES.md, random weights - timing does not depend on
values) exported to ONNX, then ``EngineBuild(precision).build(onnx, spec.profile(range),
refittable=True)`` (the W_init engine) vs ``.refit(base_engine, variant_onnx)`` for a LoRA
variant whose attention / resnet weights differ (the variant ONNX is derived from the base
graph with ``onnx_variants.derive_variant``, as the exporter does).

Writes ``benchmarks/results/export-<machine>-<YYYY-MM-DD>.json`` and a ``.md`` table beside it.

    .venv/bin/python benchmarks/export_bench.py [--quick] [--repeats N] [--no-gpu]

Full-size mode (``--full-size sd15|sdxl``, instead of the above): ``craft demo-assets --size full``
(the public architecture, random weights) then ``craft export`` of its recipe with one
content + style pair, as the user runs them (subprocesses): seconds, models built, per-model
export / parity / TensorRT build-or-refit numbers from the manifest, repository size on disk,
peak RSS of each command, and of each phase of the export (``craft export --memory-phases``: load, and
per model trace / ONNX save / adopt / bake / derive / parity_torch / parity_ort). The aim (issue 14):
the export's peak at most 2x the fp32 UNet (its ``model.onnx.data``). ``--runtime tensorrt --precision fp16``
on a GPU machine is the issue-5 export. Writes ``results/export-full-<arch>-<runtime>-<machine>-<date>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import RESULTS, cpu_model, git_state, load_average, machine_slug, write_report  # noqa: E402

# -- CPU part -----------------------------------------------------------------------------------------


def _export(recipe: Path, out: Path) -> dict:
    from craft_export.exporter import ExportOptions, export_repository

    t0, c0 = time.perf_counter(), time.process_time()
    report = export_repository(ExportOptions(recipe=recipe, out=out, runner="python"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    summary = report.summary()
    summary["wall_seconds"] = round(wall, 3)
    summary["process_cpu_seconds"] = round(cpu, 3)
    summary["model_seconds"] = dict(report.timings)
    # split each built model's seconds: ONNX trace / derive (recorded in the manifest) vs the rest
    # (mostly the ONNX Runtime-vs-PyTorch parity check, and config writing)
    records = json.loads((out / "manifest.json").read_text())["models"]
    split = {"traced": 0.0, "derived": 0.0, "parity_and_rest": 0.0}
    for name, seconds in report.timings.items():
        rec = records.get(name, {})
        kind = rec.get("export", "traced")
        split[kind] = split.get(kind, 0.0) + rec.get("export_seconds", 0.0)  # "runner": the unet model, no graph
        split["parity_and_rest"] += seconds - rec.get("export_seconds", 0.0)
    split["outside_models"] = wall - sum(report.timings.values())
    summary["seconds_split"] = {k: round(v, 3) for k, v in split.items()}
    return summary


def cpu_part(work: Path, repeats: int, with_sdxl: bool) -> dict:
    from craft_reference.demo import DEMO_LORAS, recipe_text, write_demo_assets

    demo = work / "demo"
    t0 = time.perf_counter()
    write_demo_assets(demo)
    result: dict = {"demo_assets_seconds": round(time.perf_counter() - t0, 3)}
    all_loras = list(DEMO_LORAS)

    # Incremental first: its first export also absorbs the one-time import/JIT warm-up
    # (torch.onnx, onnxruntime), so the full exports timed after it are all warm. Each cycle
    # exports the recipe without "fire" (the first time: 8 models; later: removes the 3 fire
    # models again), then with "fire" (the timed incremental export).
    recipe = work / "recipe-sd15-incremental.toml"
    repo = work / "repo-sd15-incremental"
    without = [n for n in all_loras if n != "fire"]
    first, seconds_runs = None, []
    for r in range(repeats):
        recipe.write_text(recipe_text("sd15", without, demo))
        base = _export(recipe, repo)
        first = first or base
        recipe.write_text(recipe_text("sd15", all_loras, demo))
        second = _export(recipe, repo)
        seconds_runs.append(second["wall_seconds"])
        print(f"  sd15 without fire: {base['wall_seconds']:.1f} s ({len(base['built'])} built, "
              f"{len(base['removed'])} removed); +fire: {second['wall_seconds']:.1f} s, built {second['built']}",
              flush=True)

    for arch in ["sd15"] + (["sdxl"] if with_sdxl else []):
        recipe = work / f"recipe-{arch}-full.toml"
        recipe.write_text(recipe_text(arch, all_loras, demo))
        runs = []
        for r in range(repeats):
            out = work / f"repo-{arch}-full-{r}"
            runs.append(_export(recipe, out))
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {arch} full export #{r + 1}: {runs[-1]['wall_seconds']:.1f} s, "
                  f"{len(runs[-1]['built'])} models", flush=True)
        walls = [run["wall_seconds"] for run in runs]
        result[f"{arch}_full"] = {
            "loras": all_loras, "models_built": len(runs[-1]["built"]), "built": runs[-1]["built"],
            "seconds_median": round(statistics.median(walls), 3), "seconds_runs": walls,
            "process_cpu_seconds_runs": [run["process_cpu_seconds"] for run in runs],
            "model_seconds_last_run": runs[-1]["model_seconds"],
            "seconds_split_last_run": runs[-1]["seconds_split"],
        }

    full = result["sd15_full"]["seconds_median"]
    incremental = statistics.median(seconds_runs)
    result["sd15_incremental"] = {
        "initial_loras": without, "added_lora": "fire",
        "initial_seconds": first["wall_seconds"], "initial_built": first["built"],
        "seconds": round(incremental, 3), "seconds_runs": seconds_runs,
        "seconds_split_last_run": second["seconds_split"],
        "process_cpu_seconds": second["process_cpu_seconds"],
        "initial_process_cpu_seconds": first["process_cpu_seconds"], "built": second["built"], "reused": second["reused"],
        "removed": second["removed"], "model_seconds": second["model_seconds"],
        "ratio_incremental_over_full": round(incremental / full, 3) if full else None,
    }
    return result


# -- full-size mode ---------------------------------------------------------------------------------


# Runs argv[1:] and prints its peak RSS (KiB) as the last stderr line: in a fresh process,
# RUSAGE_CHILDREN covers exactly that one command.
_PEAK_RSS_WRAPPER = ("import resource, subprocess, sys\n"
                     "code = subprocess.run(sys.argv[1:]).returncode\n"
                     "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
                     "sys.exit(code)\n")


def _timed_command(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, stdout) of a command; it must succeed."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_WRAPPER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    return seconds, peak_kib * 1024, proc.stdout


def _tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def full_size_part(work: Path, arch: str, runtime: str, precision: str, pairs: str) -> dict:
    """``craft demo-assets --size full`` + ``craft export`` of one architecture, as subprocesses."""
    craft = str(Path(sys.executable).with_name("craft"))
    assets, repo = work / "assets", work / "repo"
    seconds, peak, _ = _timed_command([craft, "demo-assets", "--out", str(assets), "--size", "full", "--arch", arch])
    result: dict = {"arch": arch, "runtime": runtime, "precision": precision, "pairs": pairs,
                    "demo_assets_seconds": round(seconds, 1), "demo_assets_peak_rss_gb": round(peak / 2**30, 2),
                    "assets_gb": round(_tree_bytes(assets) / 2**30, 2)}
    print(f"  full-size {arch} assets: {seconds:.0f} s, {result['assets_gb']} GB", flush=True)
    seconds, peak, stdout = _timed_command([craft, "export", "--recipe", str(assets / f"recipe-{arch}-full.toml"),
                                            "--out", str(repo), "--runtime", runtime, "--precision", precision,
                                            "--pairs", pairs, "--json", "--memory-phases"])
    summary = json.loads(stdout.strip().splitlines()[-1])
    # --memory-phases resets the kernel's high-water mark at each phase, so ru_maxrss covers the last
    # phase only: the export's own record of its marks is the peak of the whole run
    memory = summary.get("memory") or {}
    peak = max(peak, int(memory.get("peak_bytes", 0)))
    records = json.loads((repo / "manifest.json").read_text())["models"]
    base = next((name for name, r in records.items() if name.startswith("unet") and r.get("export") == "traced"), None)
    unet_bytes = (repo / base / "1" / "model.onnx.data").stat().st_size if base else 0
    keep = ("export", "export_seconds", "parity_max_abs_err", "trt_build", "trt_seconds", "trt_max_abs_err_vs_onnx",
            "trt_engine_bytes", "onnx_removed")
    result.update(export_seconds=round(seconds, 1), export_peak_rss_gb=round(peak / 2**30, 2),
                  models_built=summary["built"], repository_gb=round(_tree_bytes(repo) / 2**30, 2),
                  models={name: {k: r[k] for k in keep if k in r} for name, r in records.items()},
                  unet_fp32_gb=round(unet_bytes / 2**30, 2), aim_peak_rss_gb=round(2 * unet_bytes / 2**30, 2),
                  memory_phases_resettable=memory.get("resettable"),
                  phase_peak_rss_gb={name: round(b / 2**30, 2) for name, b in memory.get("phases", {}).items()})
    print(f"  full-size {arch} export ({runtime}, {precision}): {seconds:.0f} s, {len(summary['built'])} models, "
          f"{result['repository_gb']} GB, peak RSS {result['export_peak_rss_gb']} GB", flush=True)
    return result


def full_size_markdown(report: dict) -> str:
    r = report["full_size"]
    lines = [f"# Full-size export - {r['arch']} - {report['machine']} - {report['date']}", "",
             f"`craft demo-assets --size full --arch {r['arch']}` then `craft export --runtime {r['runtime']} "
             f"--precision {r['precision']} --pairs {r['pairs']}` (public architecture, random weights). "
             f"CPU: {report['cpu_model']}, {report['cores']} cores" + (f"; GPU: {report['gpu_name']}" if report.get("gpu_name") else "")
             + ".", "",
             "Sizes in GiB (2^30 bytes; result files written before this line was added say GB for the same unit).", "",
             "| step | seconds | peak RSS (GiB) | on disk (GiB) |", "|---|---:|---:|---:|",
             f"| demo-assets --size full | {r['demo_assets_seconds']} | {r['demo_assets_peak_rss_gb']} | {r['assets_gb']} |",
             f"| export ({len(r['models_built'])} models) | {r['export_seconds']} | {r['export_peak_rss_gb']} | "
             f"{r['repository_gb']} |", "",
             "| model | ONNX | ONNX seconds | max abs err ONNX vs PyTorch | TensorRT | TensorRT seconds | max abs err TRT vs ONNX |",
             "|---|---|---:|---:|---|---:|---:|"]
    for name, m in sorted(r["models"].items()):
        err = max(m.get("parity_max_abs_err", {}).values(), default=None)
        lines.append(f"| {name} | {m.get('export', '')} | {m.get('export_seconds', '')} | "
                     f"{'' if err is None else f'{err:.2g}'} | {m.get('trt_build', '')} | {m.get('trt_seconds', '')} | "
                     f"{m.get('trt_max_abs_err_vs_onnx', '')} |")
    phases = r.get("phase_peak_rss_gb")
    if phases:
        lines += ["", f"Peak RSS per phase of the export (`craft export --memory-phases`; VmHWM reset at each phase: "
                  f"{'yes' if r.get('memory_phases_resettable') else 'no, so each figure is the peak so far'}). "
                  f"Aim: at most 2x the fp32 UNet ({r['unet_fp32_gb']} GiB) = {r['aim_peak_rss_gb']} GiB; "
                  f"whole export: {r['export_peak_rss_gb']} GiB.", "", "| phase | peak RSS (GiB) |", "|---|---:|"]
        lines += [f"| {name} | {gb} |" for name, gb in phases.items()]
    return "\n".join(lines) + "\n"


# -- GPU part (untested here: needs CUDA + TensorRT) ------------------------------------------------


def gpu_skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "skipped: torch not importable"
    if not torch.cuda.is_available():
        return "skipped: no CUDA GPU"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "skipped: tensorrt not importable (install the 'gpu' extra)"
    return None


def gpu_part(work: Path, precision: str, size: int) -> dict:
    """SDXL-architecture UNet: ONNX export, TensorRT build (refittable) vs refit of a LoRA variant.

    UNTESTED-BUT-PLAUSIBLE: written against the project's EngineBuild API; not run on a GPU here.
    """
    import onnx
    import tensorrt as trt
    import torch
    from diffusers import UNet2DConditionModel

    from craft_export.architectures import UNET_CONFIGS, spec_configs
    from craft_export.networks import UNetNet
    from craft_export.onnx_export import example_inputs, export_onnx
    from craft_export.onnx_variants import derive_variant
    from craft_export.network_specs import network_specs
    from craft_export.specs import ImageRange
    from craft_export.tensorrt_build import EngineBuild
    from craft_export.trt_policy import profile_batch

    out: dict = {"label": "UNTESTED on CPU-only machines: SDXL UNet, public config, random weights",
                 "device": torch.cuda.get_device_name(0), "tensorrt": trt.__version__, "precision": precision}
    spec = network_specs("sdxl", spec_configs("sdxl"), max_batch=2)["unet"]
    image_range = ImageRange((size // 2, size // 2), (size, size), (size, size))
    out["image_range_px"] = [image_range.min_hw, image_range.opt_hw, image_range.max_hw]

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sdxl"]).eval().requires_grad_(False)
    out["unet_parameters_m"] = round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)
    net = UNetNet(unet).cuda()
    base_onnx = work / "sdxl-unet" / "base" / "model.onnx"
    t0 = time.perf_counter()
    # trace at the smallest size of the range (batch 2: dynamic axes need size >= 2)
    inputs = {k: v.cuda() for k, v in example_inputs(spec, hw=image_range.min_hw, batch=2, seed=0).items()}
    export_onnx(net, spec, inputs, base_onnx)
    out["onnx_export_seconds"] = round(time.perf_counter() - t0, 1)

    # A LoRA-like variant: perturb the attention projections and resnet convs (the demo LoRA
    # targets); initializer names are the parameter names (do_constant_folding=False).
    from craft_reference.demo import lora_target_modules
    from craft_export.loading import unet_module_shapes

    names = {init.name for init in onnx.load(str(base_onnx), load_external_data=False).graph.initializer}
    params = dict(net.named_parameters())
    g = torch.Generator("cpu").manual_seed(1)
    overrides = {}
    for m in lora_target_modules(unet_module_shapes(unet)):
        key = f"unet.{m}.weight"
        if key in names:
            w = params[key].detach().float().cpu()
            overrides[key] = w + 0.01 * w.std() * torch.randn(w.shape, generator=g)
    variant_onnx = work / "sdxl-unet" / "variant" / "model.onnx"
    variant_onnx.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    derive_variant(base_onnx, overrides, variant_onnx)
    out["variant_onnx_derive_seconds"] = round(time.perf_counter() - t0, 1)
    out["variant_weights_changed"] = len(overrides)
    del net, unet
    torch.cuda.empty_cache()

    builder = EngineBuild(precision)
    profile = spec.profile(image_range, profile_batch("unet", spec.max_batch))  # as craft export builds it
    t0 = time.perf_counter()
    base_engine = builder.build(base_onnx, profile, refittable=True)
    out["build_seconds"] = round(time.perf_counter() - t0, 1)
    out["engine_bytes"] = len(base_engine)
    # second build: the timing cache is warm now (what a re-export without refit would pay)
    t0 = time.perf_counter()
    builder.build(variant_onnx, profile, refittable=True)
    out["build_seconds_warm_timing_cache"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    refitted = builder.refit(base_engine, variant_onnx)  # includes reading the variant ONNX
    out["refit_seconds"] = round(time.perf_counter() - t0, 1)
    out["refit_engine_bytes"] = len(refitted)
    out["ratio_refit_over_build"] = round(out["refit_seconds"] / out["build_seconds"], 4)
    return out


# -- report -------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    cpu = report["cpu"]
    lines = [f"# Export benchmark - {report['machine']} - {report['date']}", "",
             f"Mode: {report['mode']}. CPU: {report['cpu_model']}, {report['cores']} cores, torch threads "
             f"{report['torch_threads']}. Load average at start {report['load_average_start']}, "
             f"at end {report['load_average_end']} (other processes were running).", "",
             "| case | models built | seconds | notes |", "|---|---:|---:|---|"]
    for arch in ("sd15", "sdxl"):
        c = cpu.get(f"{arch}_full")
        if c:
            lines.append(f"| {arch} tiny, full export (4 LoRAs) | {c['models_built']} | {c['seconds_median']:.2f} | "
                         f"median of {len(c['seconds_runs'])}: {c['seconds_runs']} |")
    inc = cpu["sd15_incremental"]
    lines.append(f"| sd15 tiny, export without `fire` | {len(inc['initial_built'])} | {inc['initial_seconds']:.2f} | "
                 "first export of the run (includes import warm-up) |")
    lines.append(f"| sd15 tiny, re-export adding `fire` | {len(inc['built'])} | {inc['seconds']:.2f} | "
                 f"median of {len(inc['seconds_runs'])}: {inc['seconds_runs']}; built {', '.join(inc['built'])}; "
                 f"reused {len(inc['reused'])} |")
    lines.append(f"| ratio incremental / full (sd15) | | {inc['ratio_incremental_over_full']:.3f} | |")
    lines += ["", "Where the seconds go (last run; seconds): ONNX trace of W_init / networks, derive of UNet variants "
              "from the W_init graph, parity check + config per model, and outside the per-model loop (loading, "
              "planning, pipeline models, manifest).", "",
              "| case | traced | derived | parity + rest | outside models |", "|---|---:|---:|---:|---:|"]
    for label, split in ((f"{a} full" , cpu[f"{a}_full"]["seconds_split_last_run"]) for a in ("sd15", "sdxl")
                         if f"{a}_full" in cpu):
        lines.append(f"| {label} | {split['traced']} | {split['derived']} | {split['parity_and_rest']} | "
                     f"{split['outside_models']} |")
    split = inc["seconds_split_last_run"]
    lines.append(f"| sd15 +fire | {split['traced']} | {split['derived']} | {split['parity_and_rest']} | "
                 f"{split['outside_models']} |")
    lines.append("")
    gpu = report["gpu"]
    if isinstance(gpu, str):
        lines.append(f"GPU (TensorRT build vs refit, SDXL UNet): {gpu}")
    else:
        lines += ["GPU (TensorRT, SDXL-architecture UNet, random weights) - " + gpu.get("label", ""), "",
                  "| step | seconds |", "|---|---:|"]
        for key in ("onnx_export_seconds", "variant_onnx_derive_seconds", "build_seconds",
                    "build_seconds_warm_timing_cache", "refit_seconds", "ratio_refit_over_build"):
            if key in gpu:
                lines.append(f"| {key} | {gpu[key]} |")
        if "error" in gpu:
            lines.append(f"\nerror: {gpu['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, SD 1.5 only (no SDXL full export)")
    parser.add_argument("--repeats", type=int, default=None, help="full exports per architecture and incremental cycles (default 3, quick 1)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the TensorRT part even with a GPU")
    parser.add_argument("--gpu-precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--gpu-size", type=int, default=1024, help="opt/max image size (px) of the engine profile")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default results/export-<machine>-<date>.json)")
    parser.add_argument("--full-size", choices=("sd15", "sdxl"), default=None,
                        help="instead: demo-assets --size full + craft export of this architecture")
    parser.add_argument("--runtime", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                        help="--full-size: the export runtime")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                        help="--full-size: export precision (default fp16 for tensorrt, fp32 otherwise)")
    parser.add_argument("--pairs", default="dog+watercolor", help="--full-size: the pairs exported")
    parser.add_argument("--work", type=Path, default=None,
                        help="--full-size: folder for assets and repository (default a temporary one; SDXL needs ~60 GB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if args.full_size:
        return full_size_main(args)

    repeats = args.repeats or (1 if args.quick else 3)
    date = datetime.date.today().isoformat()
    report = {
        "benchmark": "export", "date": date, "machine": machine_slug(), "cpu_model": cpu_model(),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "git": git_state(), "mode": "quick" if args.quick else "full", "repeats": repeats,
        "load_average_start": load_average(),
    }
    print(f"export benchmark on {report['machine']} ({report['mode']}), load average {report['load_average_start']}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="craft-export-bench-") as tmp:
        report["cpu"] = cpu_part(Path(tmp), repeats, with_sdxl=not args.quick)
        reason = "skipped: --no-gpu" if args.no_gpu else gpu_skip_reason()
        if reason:
            report["gpu"] = reason
        else:
            try:
                report["gpu"] = gpu_part(Path(tmp), args.gpu_precision, args.gpu_size)
            except Exception as exc:  # noqa: BLE001 - the CPU numbers are still worth writing
                report["gpu"] = {"label": "UNTESTED", "error": f"{type(exc).__name__}: {exc}"}
    report["load_average_end"] = load_average()

    write_report(report, args.out or RESULTS / f"export-{report['machine']}-{date}.json", markdown(report))
    return 0


def full_size_main(args: argparse.Namespace) -> int:
    import torch

    precision = args.precision or ("fp16" if args.runtime == "tensorrt" else "fp32")
    date = datetime.date.today().isoformat()
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine = machine_slug() if gpu_name is None else "gpu-" + "".join(c if c.isalnum() else "-" for c in gpu_name.lower())
    report = {"benchmark": "export-full-size", "date": date, "machine": machine, "cpu_model": cpu_model(),
              "cores": os.cpu_count(), "gpu_name": gpu_name, "python": platform.python_version(),
              "torch": torch.__version__, "git": git_state(), "load_average_start": load_average()}
    print(f"full-size export benchmark ({args.full_size}, {args.runtime}, {precision}) on {machine}", flush=True)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="craft-export-full-", dir=args.work) as tmp:
        report["full_size"] = full_size_part(Path(tmp), args.full_size, args.runtime, precision, args.pairs)
    report["load_average_end"] = load_average()
    out = args.out or RESULTS / f"export-full-{args.full_size}-{args.runtime}-{machine}-{date}.json"
    write_report(report, out, full_size_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
