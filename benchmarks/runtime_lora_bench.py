"""Runtime-LoRA UNet vs baked UNet: per-call latency on CPU (ONNX Runtime), and repository size (issue 14).

Tiny SD 1.5 demo model (``craft_reference``), 64x64 px. The baked variant's graph is the W_init
graph with other weights (same ops, same latency), so "baked" is the W_init UNet exported as the
exporter does. "runtime" is the runtime-LoRA network exported at max rank R (4, 16, 64): every LoRA
of rank <= R costs the same (zero padding), so R is the variable, not the LoRA's own rank. Each
call runs with ``batch + 1`` bank slots holding random factors and a different LoRA per sample.
ONNX Runtime with one intra-op thread; median of ``--repeats`` calls after two warm-ups.

Sizes: the files of one runtime export at R = 64 (W_init + runtime network + one factor file per
LoRA) against a baked repository of N contents x N styles (1 + 2N + N^2 UNet variants), computed
from the measured file sizes (the text encoder / VAE are the same in both and left out).

    .venv/bin/python benchmarks/runtime_lora_bench.py [--quick] [--repeats N]

Writes ``benchmarks/results/runtime-lora-<machine>-<YYYY-MM-DD>.json`` and a ``.md`` table.
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


def _time(session, inputs, repeats: int) -> float:
    for _ in range(2):
        session.run_torch(inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run_torch(inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    import torch

    from craft_export.loading import load_pipeline_parts, unet_module_shapes
    from craft_export.network_specs import network_specs
    from craft_export.networks import UNetNet
    from craft_export.onnx_export import example_inputs, export_onnx
    from craft_export.ort import OrtSession
    from craft_export.runtime_export import layout_for, runtime_examples, write_factors
    from craft_export.runtime_network import RuntimeUNetNet, runtime_spec
    from craft_ops.routing import PRESETS
    from craft_reference.tiny import build_tiny_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="max ranks 4 and 64 only, 10 repeats")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--grid", type=int, default=10, help="N of the N x N repository size comparison")
    args = ap.parse_args()
    ranks = (4, 64) if args.quick else (4, 16, 64)
    repeats = 10 if args.quick else args.repeats
    batches, hw = (1, 2, 8), (64, 64)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = load_pipeline_parts(build_tiny_pipeline("sd15", tmp / "sd15", seed=0))
        shapes = unet_module_shapes(parts.unet)
        unet = UNetNet(parts.unet).eval()
        unet_spec = network_specs("sd15", parts)["unet"]
        export_onnx(unet, unet_spec, example_inputs(unet_spec, hw=(128, 128), batch=2), tmp / "baked" / "model.onnx")
        baked = OrtSession(tmp / "baked" / "model.onnx", threads=1)
        rows, sizes = [], {"unet_base": _files_bytes(tmp / "baked")}
        for R in ranks:
            spec = runtime_spec(unet_spec, layout_for(shapes, PRESETS["sd15"], R))
            t0 = time.perf_counter()
            export_onnx(RuntimeUNetNet(unet, spec).eval(), spec, runtime_examples(spec, (128, 128), 2, 3, 0),
                        tmp / f"rt{R}" / "model.onnx")
            export_s = time.perf_counter() - t0
            session = OrtSession(tmp / f"rt{R}" / "model.onnx", threads=1)
            for b in batches:
                x = runtime_examples(spec, hw, b, b + 1, seed=b)
                base_inputs = {k: v for k, v in x.items() if k in unet_spec.input_names}
                ms_rt, ms_baked = _time(session, x, repeats), _time(baked, base_inputs, repeats)
                rows.append({"max_rank": R, "batch": b, "runtime_ms": round(ms_rt, 2), "baked_ms": round(ms_baked, 2),
                             "overhead": round(ms_rt / ms_baked - 1, 3), "export_s": round(export_s, 1)})
                print(rows[-1], flush=True)
            if R == 64:
                sizes["unet_lora_r64"] = _files_bytes(tmp / f"rt{R}")
                layout = spec.meta["runtime_layout"]
                from craft_ops.runtime_lora import RuntimeLayout

                lay = RuntimeLayout.from_json(layout)
                per_kind = {}
                for kind in ("content", "style"):  # one rank-64 LoRA on every module of its layer set
                    factors = {m.name: (torch.randn(64, m.fan_in), torch.randn(m.d_out, 64)) for m in lay.of_kind(kind)}
                    write_factors(tmp / "f", kind, "k" * 16, kind, 64, factors)
                    per_kind[kind] = (tmp / "f" / f"{kind}-{'k' * 16}.safetensors").stat().st_size
                sizes["factor_file_r64"] = per_kind
    n = args.grid
    variants = 1 + 2 * n + n * n
    baked_bytes = variants * sizes["unet_base"]
    runtime_bytes = sizes["unet_base"] + sizes["unet_lora_r64"] + n * sum(sizes["factor_file_r64"].values())
    report = {"bench": "runtime_lora", "date": datetime.date.today().isoformat(), "machine": cpu_model(),
              "cpus": os.cpu_count(), "load_average": load_average(), "git": git_state(), "image_px": list(hw),
              "ort_threads": 1, "repeats": repeats, "latency": rows, "bytes": sizes,
              "grid": {"n": n, "baked_variants": variants, "baked_bytes": baked_bytes, "runtime_bytes": runtime_bytes,
                       "ratio": round(baked_bytes / runtime_bytes, 2)}}
    md = ["| max rank | batch | runtime ms | baked ms | overhead |", "|---|---|---|---|---|"]
    md += [f"| {r['max_rank']} | {r['batch']} | {r['runtime_ms']} | {r['baked_ms']} | {r['overhead']:+.0%} |" for r in rows]
    md += ["", f"{n} x {n} repository, UNet files only (tiny SD 1.5, fp32): baked {variants} variants = "
               f"{baked_bytes / 2**20:.1f} MiB; runtime (W_init + runtime network at R 64 + {2 * n} rank-64 factor "
               f"files) = {runtime_bytes / 2**20:.1f} MiB; ratio {baked_bytes / runtime_bytes:.1f}x. "
               f"Load average during the run: {load_average()}.", ""]
    out = RESULTS / f"runtime-lora-{machine_slug()}-{report['date']}.json"
    write_report(report, out, "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
