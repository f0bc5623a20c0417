"""ACFG as one call vs two calls per step: whole-image latency of a runtime-LoRA repository (issue 14).

In runtime mode the serving pipeline sends a step's conditional and unconditional ACFG branches to
the repository's one ``unet`` model as ONE batch-2 request (the unconditional row at gates 0 =
W_init rides in the runtime network's call). The alternative is two requests per step, one per
branch (``PipelineRuntime(unet_calls="branch")``): the conditional row alone on the runtime network,
the unconditional row alone on W_init's own session (the runner's routing for a W_init-only call).

For each preset (``serve_bench.PRESETS``: ``tiny`` 64x64 px, ``larger`` 128x128 px, 8 steps by
the recipe's defaults) and each max rank R, a repository is exported with ``--lora-mode runtime
--max-rank R --runner python`` (the preset's rank-4 dog / watercolor LoRAs, zero-padded to R: the
cost depends on R, not on the LoRA's own rank) and the request "a dog <c> in watercolor style <s>"
(content dog, style watercolor, time-gated ACFG, the repository's default steps and size) runs
through :class:`craft_serving.runtime.PipelineRuntime` - the served pipeline's code - over
:class:`craft_serving.local_infer.LocalInfer`: the ``unet`` model's own runner
(:class:`~craft_serving.unet_weights.UNetWeights`) and ONNX Runtime sessions for the text encoder and
VAE, in this process (no tritonserver, no gRPC). Latency = ``generate`` wall time: tokenize + text
encode + every step + VAE decode. One ONNX Runtime intra-op thread. The two ways alternate request
by request (order swapped every repetition) so load drift hits both alike; one warm-up each.
The runner's merged variants and fed weights are off (``merged_variants=0``, ``fed_variants=0``):
this measures the runtime network.
Every seed's images of the two ways are compared (max abs difference of uint8 pixels; parity: <= 1).

    .venv/bin/python benchmarks/acfg_calls_bench.py [--presets tiny,larger] [--ranks 4,16,64]
        [--seeds 1,2,3] [--repeats 2] [--tag NAME]

Writes ``benchmarks/results/acfg-calls[-<tag>]-<machine>-<YYYY-MM-DD>.json`` and a ``.md`` table
(rewritten after every row).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import load_average, report_start, write_report  # noqa: E402

WAYS = {"one": "step", "two": "branch"}  # report name -> PipelineRuntime(unet_calls=...)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _markdown(report: dict) -> str:
    md = ["# ACFG as one call vs two calls per step: whole-image latency, runtime-LoRA repository", "",
          f"Machine: {report['machine']}, {report['cpus']} cores, shared with other jobs; ONNX Runtime, "
          f"{report['ort_threads']} thread; in-process serving pipeline ({report['path']}); the two ways "
          "interleaved request by request. Median over seeds x repetitions.", "",
          "one call = 1 x batch-2 request per step (cond row + uncond row at gates 0 on the runtime network); "
          "two calls = 2 x batch-1 requests per step (cond row on the runtime network, uncond row on W_init's "
          "session).", "",
          "| preset | max rank | steps | images | one call ms | two calls ms | two / one | UNet ms one | UNet ms two "
          "| max pixel diff | load (1 min) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        md.append(f"| {r['preset']} | {r['max_rank']} | {r['steps']} | {r['images']} | {r['one_ms']} | {r['two_ms']} "
                  f"| {r['two_over_one']:.2f}x | {r['unet_ms']['one']} | {r['unet_ms']['two']} "
                  f"| {r['max_pixel_diff']} | {r['load'][0]} |")
    md += ["", f"Load average at the start {report['load_average_start']}, at the end "
               f"{report.get('load_average_end')}; uptime per row in the JSON."]
    return "\n".join(md) + "\n"


def main() -> int:
    import numpy as np
    import torch

    import serve_bench
    from craft_export.exporter import ExportOptions, export_repository
    from craft_ops.request import GenerateRequest
    from craft_serving.local_infer import LocalInfer
    from craft_serving.runtime import PipelineRuntime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,larger")
    ap.add_argument("--ranks", default="4,16,64")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=2, help="repetitions per seed (each: one image each way)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    args = ap.parse_args()
    ranks = tuple(int(r) for r in args.ranks.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    torch.set_num_threads(1)
    out, report = report_start("acfg_calls", args.tag, uptime_start=_uptime(), ort_threads=1,
                               path="PipelineRuntime + LocalInfer (the unet model's UNetWeights runner), no tritonserver",
                               prompt=serve_bench.PROMPT, content=serve_bench.CONTENT, style=serve_bench.STYLE,
                               seeds=seeds, repeats=args.repeats, rows=[])

    def save() -> None:
        report["load_average_end"] = load_average()
        write_report(report, out, _markdown(report))

    with tempfile.TemporaryDirectory(prefix="acfgb-") as tmp:
        tmp = Path(tmp)
        for preset in args.presets.split(","):
            recipe = serve_bench.build_preset(preset, tmp / preset)
            for R in ranks:
                repo = tmp / preset / f"repo-r{R}"
                t0 = time.perf_counter()
                export_repository(ExportOptions(recipe=recipe, out=repo, lora_mode="runtime", max_rank=R,
                                                runner="python"))
                export_s = round(time.perf_counter() - t0, 1)
                print(f"[{preset} R={R}] exported in {export_s} s", flush=True)
                local = LocalInfer(repo, threads=1, merged_variants=0, fed_variants=0)  # every cond row on the runtime network
                pipes = {w: PipelineRuntime(local.view, local, unet_calls=mode) for w, mode in WAYS.items()}

                def generate(way: str, seed: int):
                    request = GenerateRequest(prompts=(serve_bench.PROMPT,), content=serve_bench.CONTENT,
                                              style=serve_bench.STYLE, seed=seed)
                    rows0, unet0 = len(local.unet_rows), local.unet_seconds
                    t = time.perf_counter()
                    images, plan = pipes[way].generate(request)
                    wall = time.perf_counter() - t
                    return images, plan, wall, local.unet_seconds - unet0, local.unet_rows[rows0:]

                for way in WAYS:  # warm-up: sessions opened, LoRAs cached
                    generate(way, seeds[0])
                times = {w: [] for w in WAYS}
                unet = {w: [] for w in WAYS}
                calls: dict[str, list[int]] = {}
                diffs, k = [], 0
                steps = None
                for seed in seeds:
                    images = {}
                    for _ in range(args.repeats):
                        order = tuple(WAYS) if k % 2 == 0 else tuple(reversed(WAYS))
                        k += 1
                        for way in order:
                            img, plan, wall, unet_s, rows = generate(way, seed)
                            times[way].append(wall)
                            unet[way].append(unet_s)
                            calls[way] = rows
                            steps = plan.groups[0].config.steps
                            images.setdefault(way, img)
                    diffs.append(int(np.abs(images["one"].astype(np.int16) - images["two"].astype(np.int16)).max()))
                one, two = (statistics.median(times[w]) * 1000 for w in ("one", "two"))
                report["rows"].append({
                    "preset": preset, "max_rank": R, "steps": steps, "images": len(times["one"]),
                    "one_ms": round(one, 1), "two_ms": round(two, 1), "two_over_one": round(two / one, 3),
                    "one_all_ms": [round(t * 1000, 1) for t in times["one"]],
                    "two_all_ms": [round(t * 1000, 1) for t in times["two"]],
                    "unet_ms": {w: round(statistics.median(unet[w]) * 1000, 1) for w in WAYS},
                    "unet_calls_per_image": {w: len(calls[w]) for w in WAYS},
                    "unet_rows_per_call": {w: sorted(set(calls[w])) for w in WAYS},
                    "max_pixel_diff": max(diffs), "pixel_diff_per_seed": diffs, "export_s": export_s,
                    "load": load_average(), "uptime": _uptime()})
                print(report["rows"][-1], flush=True)
                save()
                del pipes, local
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
