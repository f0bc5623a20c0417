"""``craft export``: recipe -> baked UNet variants -> ONNX / TensorRT -> Triton model repository."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from craft_export.options import LORA_MODES, PRECISIONS, RUNNERS, RUNTIMES

from .common import HelpFormatter

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from craft_export.lora_register import register_fast
    from craft_export.options import ExportOptions

    confine = args.confine_to or [p for p in os.environ.get("CRAFT_CONFINE_TO", "").split(os.pathsep) if p]
    options = ExportOptions(recipe=Path(args.recipe), out=Path(args.out), runtime=args.runtime,
                            precision=args.precision, pairs=args.pairs, runner=args.runner,
                            keep_onnx=args.keep_onnx, confine_to=tuple(Path(p) for p in confine),
                            lora_mode=args.lora_mode, max_rank=args.max_rank, memory_phases=args.memory_phases)
    say = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    # registering runtime LoRAs needs neither torch nor the exporter: import them only when networks are built
    report = register_fast(options, progress=say)
    if report is None:
        from craft_export.exporter import export_networks

        report = export_networks(options, progress=say, t_start=t_start)
    if args.json:
        print(json.dumps(report.summary()))
    else:
        print(f"built {len(report.built)}, reused {len(report.reused)}, removed {len(report.removed)} models "
              f"in {report.seconds:.1f} s -> {options.out}")
        for name, seconds in report.timings.items():
            print(f"  {name}: {seconds:.2f} s")
        if report.memory:
            print(f"  peak resident memory {report.memory['peak_bytes'] / 2**30:.2f} GiB; per phase:")
            for name, peak in report.memory["phases"].items():
                print(f"    {name}: {peak / 2**30:.2f} GiB")
        if report.loras:
            how = "registered without rebuilding any network" if report.fast_path else "written"
            print(f"  LoRA factor files {how}: {', '.join(report.loras.get('written', [])) or 'none new'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", formatter_class=HelpFormatter,
                       help="recipe -> baked UNet variants -> ONNX/TensorRT -> Triton model repository")
    p.add_argument("--recipe", required=True, help="recipe file (TOML)")
    p.add_argument("--out", required=True, help="model repository folder (created, or updated in place)")
    p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help="engine runtime")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="engine precision (fp16 / bf16: TensorRT on a GPU only)")
    p.add_argument("--pairs", default=None,
                   help="content+style pairs to bake: 'all', 'none' or NAME+NAME,... (default: all in baked mode, "
                        "none in runtime mode, where the pairs named are baked as hot pairs)")
    p.add_argument("--lora-mode", choices=LORA_MODES, default="baked",
                   help="baked: one engine per weight variant; runtime: one runtime-LoRA UNet network whose "
                        "routed modules take LoRA factors and gates as inputs, plus one factor file per LoRA "
                        "(a new LoRA is registered without rebuilding any network)")
    p.add_argument("--max-rank", type=int, default=64,
                   help="runtime mode: the rank every LoRA factor is zero-padded to; a LoRA above it is refused")
    p.add_argument("--runner", choices=RUNNERS, default="auto",
                   help="engine models: native Triton backends, Python-backend runners, or whichever the local "
                        "tritonserver supports")
    p.add_argument("--keep-onnx", action="store_true",
                   help="tensorrt: keep every UNet variant's ONNX file (otherwise only W_init's stays)")
    p.add_argument("--confine-to", action="append", metavar="DIR",
                   help="refuse recipe paths (base, backbone, LoRAs, and every file and symlink inside them) that "
                        "resolve outside DIR; repeatable (default: $CRAFT_CONFINE_TO, ':'-separated, else anywhere)")
    p.add_argument("--json", action="store_true", help="print one JSON summary line")
    p.add_argument("--memory-phases", action="store_true",
                   help="report the peak resident memory of each phase (load, trace, ONNX save, parity ...; "
                        "Linux: resets the process's VmHWM at each phase, so ru_maxrss then covers the last one only)")
    p.set_defaults(func=run)
