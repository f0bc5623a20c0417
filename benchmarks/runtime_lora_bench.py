"""Runtime-LoRA UNet vs baked UNet: per-call latency on CPU (ONNX Runtime), ACFG steps, repository size (issue 14).

Presets (``serve_bench.PRESETS``): ``tiny`` (the demo SD 1.5 UNet, 64x64 px) and ``larger`` (SD 1.5
layout at block_out_channels 96/192/384/384, 128x128 px). The baked variant's graph is the W_init
graph with other weights (same ops, same latency), so "baked" is the W_init UNet exported as the
exporter does. "runtime" is the runtime-LoRA network (``RuntimeUNetNet``, as ``craft export
--lora-mode runtime`` exports it) at max rank R (4, 16, 64): every LoRA of rank <= R costs the same
(zero padding), so R is the variable, not the LoRA's own rank.

(a) per call, worst case: batch b with EVERY sample carrying its own content AND style LoRA (bank of
    b + 1 slots, random factors) at non-zero gates, i.e. an overlap step with all branches active;
(b) one ACFG step (Eq. 10-11), what a request costs per step: runtime = ONE batch-2 call (the
    conditional row with its LoRAs, the unconditional row gates 0 = W_init) vs baked = two batch-1
    calls (the pair's variant and W_init are different engines), for an overlap step (content +
    style on) and a content-only step (the first steps of a time-gated trajectory);
(c) sizes: one runtime export at R = 64 (W_init + runtime network + one factor file per LoRA) against
    a baked repository of N contents x N styles (1 + 2N + N^2 UNet variants), from the measured file
    sizes (the text encoder / VAE are the same in both modes and left out).

ONNX Runtime with one intra-op thread; runtime and baked calls interleaved repetition by repetition
so load drifts hit both alike; median of ``--repeats`` after one warm-up (two for the tiny preset).

    .venv/bin/python benchmarks/runtime_lora_bench.py [--quick] [--presets tiny,larger] [--ranks 4,16,64]
        [--batches 1,2,8] [--repeats N] [--tag NAME]

Writes ``benchmarks/results/runtime-lora[-<tag>]-<machine>-<YYYY-MM-DD>.json`` and a ``.md`` table
(rewritten after every measured row, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import RESULTS, cpu_model, git_state, load_average, machine_slug, write_report  # noqa: E402


def _files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _interleaved(calls: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median ms of each ``name -> fn``, the calls alternating within every repetition."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}


def _active(x: dict, batch: int, kinds=("content", "style"), rows=None) -> dict:
    """Every sample (or ``rows``) on its own LoRA of each kind in ``kinds`` (slots 1..batch), gates in [0.5, 1]."""
    import torch

    g = torch.Generator().manual_seed(batch)
    x = dict(x)
    for kind in ("content", "style"):
        index = 1 + torch.arange(batch) % batch
        scale = 0.5 + 0.5 * torch.rand(batch, generator=g)
        off = torch.ones(batch, dtype=torch.bool) if kind not in kinds else torch.zeros(batch, dtype=torch.bool)
        if rows is not None:
            off |= ~torch.isin(torch.arange(batch), torch.tensor(rows))
        index[off], scale[off] = 0, 0.0
        x[f"{kind}_index"], x[f"{kind}_scale"] = index, scale
    return x


def _markdown(report: dict) -> str:
    md = [f"Machine: {report['machine']}, {report['cpus']} cores, shared with other jobs (load average at the "
          f"start {report['load_average_start']}, now {load_average()}); ONNX Runtime, one thread; runtime and "
          f"baked calls interleaved.", "",
          "(a) one UNet call, every sample with its own content + style LoRA (all branches active: the worst case)", "",
          "| preset | max rank | batch | runtime ms | baked ms | overhead |", "|---|---|---|---|---|---|"]
    md += [f"| {r['preset']} | {r['max_rank']} | {r['batch']} | {r['runtime_ms']} | {r['baked_ms']} | "
           f"{r['overhead']:+.0%} |" for r in report["latency"]]
    md += ["", "(b) one ACFG step: runtime = one batch-2 call (cond row with LoRAs + uncond row at gates 0); "
               "baked = two batch-1 calls (variant engine + W_init engine)", "",
           "| preset | max rank | step | runtime 1 x b2 ms | baked 2 x b1 ms | overhead |", "|---|---|---|---|---|---|"]
    md += [f"| {r['preset']} | {r['max_rank']} | {r['step']} | {r['runtime_ms']} | {r['baked_ms']} | "
           f"{r['overhead']:+.0%} |" for r in report["acfg_step"]]
    md += ["", "(c) 10 x 10 repository, UNet files only (fp32): baked 1 + 2N + N^2 variants vs runtime "
               "(W_init + runtime network at R 64 + 2N rank-64 factor files)", "",
           "| preset | baked MiB | runtime MiB | ratio |", "|---|---|---|---|"]
    for name, g in report["grid"].items():
        md.append(f"| {name} | {g['baked_bytes'] / 2**20:.1f} | {g['runtime_bytes'] / 2**20:.1f} | {g['ratio']}x |")
    return "\n".join(md) + "\n"


def main() -> int:
    import torch

    import serve_bench
    from craft_export.loading import load_pipeline_parts, unet_module_shapes
    from craft_export.network_specs import network_specs
    from craft_export.networks import UNetNet
    from craft_export.onnx_export import example_inputs, export_onnx
    from craft_export.ort import OrtSession
    from craft_export.runtime_export import layout_for, runtime_examples, write_factors
    from craft_export.runtime_network import RuntimeUNetNet, runtime_spec
    from craft_ops.routing import PRESETS
    from craft_ops.runtime_lora import RuntimeLayout

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="max ranks 4 and 64, batches 1 and 2, 5 repeats")
    ap.add_argument("--presets", default="tiny,larger")
    ap.add_argument("--ranks", default="4,16,64")
    ap.add_argument("--batches", default="1,2,8")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--grid", type=int, default=10, help="N of the N x N repository size comparison")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    args = ap.parse_args()
    ranks = (4, 64) if args.quick else tuple(int(r) for r in args.ranks.split(","))
    batches = (1, 2) if args.quick else tuple(int(b) for b in args.batches.split(","))
    repeats = 5 if args.quick else args.repeats
    torch.set_num_threads(1)
    date = datetime.date.today().isoformat()
    name = f"runtime-lora{'-' + args.tag if args.tag else ''}-{machine_slug()}-{date}.json"
    out = RESULTS / name
    report = {"bench": "runtime_lora", "date": date, "machine": cpu_model(), "cpus": os.cpu_count(),
              "load_average_start": load_average(), "git": git_state(), "ort_threads": 1, "repeats": repeats,
              "worst_case": "every sample its own content + style LoRA, gates in [0.5, 1]",
              "latency": [], "acfg_step": [], "bytes": {}, "grid": {}}

    def save() -> None:
        report["load_average_end"] = load_average()
        write_report(report, out, _markdown(report))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for preset in args.presets.split(","):
            recipe_dir = tmp / preset
            serve_bench.build_preset(preset, recipe_dir)
            pipe = recipe_dir / ("sd15-tiny" if serve_bench.PRESETS[preset]["unet"] is None else f"sd15-{preset}")
            size = serve_bench.PRESETS[preset]["size"]
            hw, warmup = (size, size), (2 if preset == "tiny" else 1)
            parts = load_pipeline_parts(pipe)
            shapes = unet_module_shapes(parts.unet)
            unet = UNetNet(parts.unet).eval()
            unet_spec = network_specs("sd15", parts)["unet"]
            export_onnx(unet, unet_spec, example_inputs(unet_spec, hw=hw, batch=2), tmp / f"{preset}-baked" / "model.onnx")
            baked = OrtSession(tmp / f"{preset}-baked" / "model.onnx", threads=1)
            sizes = report["bytes"].setdefault(preset, {"unet_base": _files_bytes(tmp / f"{preset}-baked")})
            print(f"[{preset}] baked UNet exported", flush=True)
            for R in ranks:
                spec = runtime_spec(unet_spec, layout_for(shapes, PRESETS["sd15"], R))
                folder = tmp / f"{preset}-rt{R}"
                t0 = time.perf_counter()
                export_onnx(RuntimeUNetNet(unet, spec).eval(), spec, runtime_examples(spec, hw, 2, 3, 0),
                            folder / "model.onnx")
                export_s = round(time.perf_counter() - t0, 1)
                session = OrtSession(folder / "model.onnx", threads=1)
                for b in batches:
                    x = _active(runtime_examples(spec, hw, b, b + 1, seed=b), b)
                    base = {k: v for k, v in x.items() if k in unet_spec.input_names}
                    ms = _interleaved({"runtime": lambda: session.run_torch(x),
                                       "baked": lambda: baked.run_torch(base)}, repeats, warmup)
                    report["latency"].append({"preset": preset, "max_rank": R, "batch": b, "runtime_ms": ms["runtime"],
                                              "baked_ms": ms["baked"], "overhead": round(ms["runtime"] / ms["baked"] - 1, 3),
                                              "export_s": export_s, "load": load_average()[:1]})
                    print(report["latency"][-1], flush=True)
                    save()
                # (b) ACFG step: cond row 0 with LoRAs, uncond row 1 at gates 0, in one call vs two baked calls
                x2 = runtime_examples(spec, hw, 2, 3, seed=7)
                base2 = {k: v for k, v in x2.items() if k in unet_spec.input_names}
                halves = [{k: v[i:i + 1] for k, v in base2.items()} for i in range(2)]
                for step, kinds in (("overlap (content + style)", ("content", "style")), ("content only", ("content",))):
                    xs = _active(x2, 2, kinds, rows=[0])

                    def two_baked():
                        baked.run_torch(halves[0])
                        baked.run_torch(halves[1])

                    ms = _interleaved({"runtime": lambda: session.run_torch(xs), "baked": two_baked}, repeats, warmup)
                    report["acfg_step"].append({"preset": preset, "max_rank": R, "step": step, "runtime_ms": ms["runtime"],
                                                "baked_ms": ms["baked"],
                                                "overhead": round(ms["runtime"] / ms["baked"] - 1, 3),
                                                "load": load_average()[:1]})
                    print(report["acfg_step"][-1], flush=True)
                    save()
                if R == max(ranks):
                    sizes[f"unet_lora_r{R}"] = _files_bytes(folder)
                    lay = RuntimeLayout.from_json(spec.meta["runtime_layout"])
                    per_kind = {}
                    for kind in ("content", "style"):  # one rank-R LoRA on every module of its layer set
                        factors = {m.name: (torch.randn(R, m.fan_in), torch.randn(m.d_out, R)) for m in lay.of_kind(kind)}
                        write_factors(tmp / "f", kind, "k" * 16, kind, R, factors)
                        per_kind[kind] = (tmp / "f" / f"{kind}-{'k' * 16}.safetensors").stat().st_size
                    sizes[f"factor_file_r{R}"] = per_kind
                    n = args.grid
                    variants = 1 + 2 * n + n * n
                    baked_bytes = variants * sizes["unet_base"]
                    runtime_bytes = sizes["unet_base"] + sizes[f"unet_lora_r{R}"] + n * sum(per_kind.values())
                    report["grid"][preset] = {"n": n, "max_rank": R, "baked_variants": variants,
                                              "baked_bytes": baked_bytes, "runtime_bytes": runtime_bytes,
                                              "ratio": round(baked_bytes / runtime_bytes, 2)}
                    save()
                del session
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
