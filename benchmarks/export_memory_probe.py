"""The full-size SD 1.5 UNet's export phases in isolation, with the peak resident memory of each.

What ``craft export`` does for ``unet_base`` (trace, ONNX save, adopt, parity PyTorch, parity ONNX
Runtime) and one derived variant (``unet_c-dog_s-watercolor``: bake, derive, parity), under
:func:`craft_export.memory.track_phases`, in one process, from ``craft demo-assets --size full``.
The text encoder's and VAE's weights are dropped after loading (a real export has moved them onto
their exported files by then). Takes ~20-40 min on 2 loaded cores.

``--mode before`` puts back what the export did before issue 14's "2x" work, to measure it the same
way: the UNet's weights adopted while the baker still referenced the loaded copy (no early free, no
release of the compared pages) and the parity check at the engine's own sizes (512 px batch 2,
512x768 batch 1). ``--mode after``: the code as it is.

    .venv/bin/craft demo-assets --out ASSETS --size full --arch sd15
    .venv/bin/python benchmarks/export_memory_probe.py --mode before --assets ASSETS --work DIR

Writes ``results/export-memory-probe-sd15-<mode>-<machine>-<date>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from _common import RESULTS, git_state, load_average, machine_slug, write_report

VARIANT = "unet_c-dog_s-watercolor"


def _put_back_before() -> None:
    from craft_export import model_build
    from craft_export.loading import unet_weights

    def adopt_weights(job, nets, baker, onnx_path, weights):  # as before: W_init still referenced
        if job.network == "unet_lora" or job.is_variant:
            return
        module = nets.unet if job.network == "unet" else model_build.network_module(nets, baker, job)[0]
        if weights.adopt(module, onnx_path) and job.network == "unet":
            baker.W_init = unet_weights(nets.unet.unet)

    model_build.adopt_weights = adopt_weights
    model_build.ADOPT_RELEASE_BYTES = 1 << 60  # compared pages kept until the end
    model_build.PARITY_MAX_SIDE = 1 << 30  # parity at the engine range's min size (512 px)


def probe(mode: str, assets: Path, work: Path) -> dict:
    import torch

    from craft_export import model_build
    from craft_export.exporter import ExportOptions, load_everything, plan_jobs
    from craft_export.memory import phase, track_phases
    from craft_export.network_specs import network_specs

    if mode == "before":
        _put_back_before()
    options = ExportOptions(recipe=assets / "recipe-sd15-full.toml", out=work / "repo", runner="python",
                            pairs="dog+watercolor", memory_phases=True)
    out: dict = {"mode": mode, "models": {}}
    t0 = time.perf_counter()
    with track_phases() as peaks:
        with phase("load"):
            loaded = load_everything(options)
            for m in (*loaded.nets.text_encoders, loaded.nets.vae):
                for p in m.parameters():
                    p.data = torch.empty(0)
            model_build.trim_memory()
        specs = network_specs(loaded.parts.arch, loaded.parts, max_batch=loaded.engine.max_batch)
        e = loaded.engine
        build = {"runtime": "onnxruntime", "precision": "fp32", "runner": "python",
                 "engine": [e.min_size, e.opt_size, e.max_size, e.max_batch]}
        jobs = {j.name: j for j in plan_jobs(loaded, build)}
        weights, base_onnx, staging = model_build.ExportWeights(), None, work / "staging"
        for name in ("unet_base", VARIANT):
            t = time.perf_counter()
            with phase(name):
                rec = model_build.build_model(jobs[name], loaded.nets, loaded.baker, loaded.engine, options, "python",
                                              staging, specs, base_onnx, None, weights)
            out["models"][name] = {"seconds": round(time.perf_counter() - t, 1), "export": rec["export"],
                                   "parity_max_abs_err": rec["parity_max_abs_err"]}
            if name == "unet_base":
                base_onnx = staging / name / "1" / "model.onnx"
            print(name, out["models"][name], flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["resettable"] = peaks.resettable
    out["peak_gib"] = round(peaks.peak / 2**30, 3)
    out["phase_peak_gib"] = {k: round(v / 2**30, 3) for k, v in peaks.peaks.items()}
    return out


def markdown(report: dict) -> str:
    r = report["probe"]
    lines = [f"# Full-size SD 1.5 UNet export phases, mode {r['mode']} - {report['machine']} - {report['date']}", "",
             "`benchmarks/export_memory_probe.py` (unet_base + one derived variant in isolation; text encoder and VAE "
             "weights dropped after loading). Peak RSS in GiB per phase (VmHWM reset at each phase boundary).", "",
             f"Whole probe: {r['peak_gib']} GiB peak, {r['seconds']} s. Load average at start "
             f"{report['load_average_start']}.", "", "| phase | peak RSS (GiB) |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in r["phase_peak_gib"].items()]
    lines += ["", "| model | seconds | max abs err ONNX vs PyTorch |", "|---|---:|---:|"]
    lines += [f"| {k} | {m['seconds']} | {max(m['parity_max_abs_err'].values()):.2g} |" for k, m in r["models"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("before", "after"), required=True)
    parser.add_argument("--assets", type=Path, required=True, help="craft demo-assets --size full --arch sd15 folder")
    parser.add_argument("--work", type=Path, required=True, help="folder for the exported graphs (~7 GB)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    date = datetime.date.today().isoformat()
    report = {"benchmark": "export-memory-probe", "date": date, "machine": machine_slug(), "git": git_state(),
              "load_average_start": load_average()}
    report["probe"] = probe(args.mode, args.assets, args.work)
    report["load_average_end"] = load_average()
    out = args.out or RESULTS / f"export-memory-probe-sd15-{args.mode}-{report['machine']}-{date}.json"
    write_report(report, out, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
