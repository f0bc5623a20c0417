"""Per image: a runtime-LoRA repository (with and without merged variants) against a baked one (issue 14).

The issue's aim is "runtime mode within 10 % of baked per image at rank 64 on the larger preset".
For one preset (``serve_bench.PRESETS``, default ``larger``: SD 1.5 layout at 96/192/384/384
channels, 128x128 px) the same recipe (the preset's rank-4 dog / watercolor LoRAs) is exported
twice with the Python runner: ``--lora-mode baked`` (W_init, each LoRA alone and the pair baked:
every step of the request on a baked session) and ``--lora-mode runtime --max-rank R`` (the LoRAs
zero-padded to R: the runtime network's cost depends on R, not on the LoRA's own rank). The request
"a dog <c> in watercolor style <s>" (time-gated ACFG, the recipe's size) then runs through
:class:`craft_serving.runtime.PipelineRuntime` over :class:`craft_serving.local_infer.LocalInfer`
(the ``unet`` model's own runner, in this process) four ways:

* ``baked``: the baked repository;
* ``runtime``: the runtime repository with merging and fed weights off (``merged_variants=0``,
  ``fed_variants=0``): every conditional row on the runtime network, ACFG as one batch-2 call per step;
* ``fed``: merging off, fed weights on (``merged_variants=0``): every conditional row on W_init's
  graph with the variant's merged weights fed as inputs (``serving/fed_unet.py``), the unconditional
  row on W_init's session; the held merged weights are dropped before each request (a new pair: its
  LoRAs are merged during the request, into the dropped arrays' memory, as on a server whose fed
  units are all taken);
* ``merged cold``: the runtime repository as served by default (fed weights on, ``merge_after=2``,
  builds on a worker thread once the runner is idle for 250 ms), merged variants and fed weights
  cleared before the request: each variant's calls run on the fed session until its merged session
  is ready (the bench waits for unfinished builds after the request, untimed, so they do not slow
  the next way);
* ``merged warm``: the same request once every variant of it is merged (run untimed until no new
  merge happens): what a repeated LoRA pair and gamma costs.

Latency = ``generate`` wall time (tokenize + text encode + every step + VAE decode), one ONNX Runtime
and one torch thread, the ways alternating within each repetition (order rotated) so load drift hits
all alike, one warm-up each; the images of every way are compared with the baked one (uint8, <= 1).
Also recorded per image: the process's CPU time over the same span (``time.process_time``: all its
threads, so a merge worker that runs during the request counts; time the hypervisor stole from the
VM does not), and per row the paired overhead: the median over repetitions of each image's time
against the baked image of the same repetition (one apart at most in the rotated order), which
cancels most of a VM's drift between repetitions. The CPU time of the machine's steal counter
(``/proc/stat``) during the row is reported beside.

    .venv/bin/python benchmarks/runtime_image_bench.py [--preset larger] [--max-rank 64] [--steps 8,20]
        [--seeds 1,2] [--repeats 1] [--tag NAME]

Writes ``benchmarks/results/runtime-image[-<tag>]-<machine>-<YYYY-MM-DD>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import load_average, report_start, write_report  # noqa: E402

WAYS = ("baked", "runtime", "fed", "merged cold", "merged warm")


def _steal_jiffies() -> int | None:
    """The machine's cumulative ``steal`` time from ``/proc/stat`` (jiffies), None where there is none."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return None


def _paired(times: dict[str, list[float]], way: str) -> float:
    """Median over repetitions of ``way``'s time / the baked time of the same repetition - 1."""
    return round(statistics.median(t / b - 1 for t, b in zip(times[way], times["baked"])), 4)


def _markdown(report: dict) -> str:
    md = ["# Per image: runtime-LoRA repository (runtime network, fed weights, merged variants) vs baked repository", "",
          f"Machine: {report['machine']}, {report['cpus']} cores; ONNX Runtime and torch, 1 thread each; in-process "
          f"serving pipeline ({report['path']}); preset {report['preset']}, runtime max rank {report['max_rank']}; "
          "ways alternating within each repetition. Median over seeds x repetitions; overhead against baked.", "",
          "| steps | images | baked ms | runtime ms | fed ms | merged cold ms | merged warm ms | runtime | fed "
          "| merged cold | merged warm | merges started / request | build s | max pixel diff vs baked | load (1 min) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ms = r["ms"]
        md.append(f"| {r['steps']} | {r['images']} | {ms['baked']} | {ms['runtime']} | {ms['fed']} | {ms['merged cold']} "
                  f"| {ms['merged warm']} | {r['overhead']['runtime']:+.0%} | {r['overhead']['fed']:+.0%} "
                  f"| {r['overhead']['merged cold']:+.0%} "
                  f"| {r['overhead']['merged warm']:+.0%} | {r['builds_per_request']} | {r['build_s']} "
                  f"| {r['max_pixel_diff']} | {r['load'][0]} |")
    if all("paired" in r for r in report["rows"]):
        md += ["", "Paired (median over repetitions of each image against the baked image of its repetition), "
               "by wall time and by the process's CPU time:", "",
               "| steps | images | runtime | fed | merged cold | merged warm | CPU: baked ms | CPU: runtime | CPU: fed "
               "| CPU: merged cold | CPU: merged warm | steal s during the row |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["rows"]:
            pw, pc = r["paired"], r["paired_cpu"]
            md.append(f"| {r['steps']} | {r['images']} | " + " | ".join(f"{pw[w]:+.1%}" for w in WAYS[1:])
                      + f" | {r['cpu_ms']['baked']} | " + " | ".join(f"{pc[w]:+.1%}" for w in WAYS[1:])
                      + f" | {r['steal_s']} |")
    md += ["", f"Load average at the start {report['load_average_start']}, at the end {report.get('load_average_end')}."
           " Exports: " + ", ".join(f"{k} {v} s" for k, v in report["export_s"].items()) + "."]
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
    ap.add_argument("--preset", default="larger", choices=sorted(serve_bench.PRESETS))
    ap.add_argument("--max-rank", type=int, default=64)
    ap.add_argument("--steps", default="8,20")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--repeats", type=int, default=1, help="repetitions per seed (each: one image each way)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    args = ap.parse_args()
    steps_list = tuple(int(s) for s in args.steps.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    torch.set_num_threads(1)
    out, report = report_start("runtime_image", args.tag, threads=1, preset=args.preset, max_rank=args.max_rank,
                               path="PipelineRuntime + LocalInfer (the unet model's UNetWeights runner)",
                               prompt=serve_bench.PROMPT, seeds=seeds, repeats=args.repeats, export_s={}, rows=[])

    def save() -> None:
        report["load_average_end"] = load_average()
        write_report(report, out, _markdown(report))

    with tempfile.TemporaryDirectory(prefix="rtimg-") as tmp:
        tmp = Path(tmp)
        recipe = serve_bench.build_preset(args.preset, tmp)
        repos = {"baked": tmp / "baked", "runtime": tmp / f"runtime-r{args.max_rank}"}
        for mode, repo in repos.items():
            t0 = time.perf_counter()
            export_repository(ExportOptions(recipe=recipe, out=repo, lora_mode=mode, runner="python",
                                            **({"max_rank": args.max_rank} if mode == "runtime" else {})))
            report["export_s"][mode] = round(time.perf_counter() - t0, 1)
            print(f"[{mode}] exported in {report['export_s'][mode]} s", flush=True)
        locals_ = {"baked": LocalInfer(repos["baked"], threads=1),
                   "runtime": LocalInfer(repos["runtime"], threads=1, merged_variants=0, fed_variants=0),
                   "fed": LocalInfer(repos["runtime"], threads=1, merged_variants=0),
                   "merged": LocalInfer(repos["runtime"], threads=1)}
        pipes = {name: PipelineRuntime(local.view, local) for name, local in locals_.items()}
        runner = locals_["merged"].unet

        def generate(way: str, seed: int, steps: int):
            request = GenerateRequest(prompts=(serve_bench.PROMPT,), content=serve_bench.CONTENT,
                                      style=serve_bench.STYLE, seed=seed, steps=steps)
            if way == "merged cold":
                runner.merged.clear()
            if way in ("fed", "merged cold"):  # a new pair: its weights not merged yet
                locals_[way.split()[0]].unet.merged.fed.clear()
            elif way == "merged warm":  # untimed runs until every variant of the request is merged
                for _ in range(3):
                    before = runner.merged.built
                    pipes["merged"].generate(request)
                    if runner.merged.built == before:
                        break
            built = runner.merged.built if runner.merged is not None else 0
            c, t = time.process_time(), time.perf_counter()
            images, _ = pipes[way.split()[0]].generate(request)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            if way == "merged cold":  # builds still running would slow the next way's request down
                runner.merged.wait()
            builds = (runner.merged.built - built) if way.startswith("merged") else 0
            return images, wall, cpu, builds

        for way in WAYS:  # warm-up: sessions opened, LoRAs cached
            generate(way, seeds[0], steps_list[0])
        for steps in steps_list:
            times = {w: [] for w in WAYS}
            cpus = {w: [] for w in WAYS}
            steal0 = _steal_jiffies()
            builds: list[int] = []
            build_s: list[float] = []
            diffs, k = [], 0
            for seed in seeds:
                for _ in range(args.repeats):
                    order = WAYS[k % len(WAYS):] + WAYS[:k % len(WAYS)]
                    k += 1
                    images = {}
                    for way in order:
                        n0 = len(runner.merged.build_seconds)
                        img, wall, cpu, b = generate(way, seed, steps)
                        times[way].append(wall)
                        cpus[way].append(cpu)
                        images[way] = img
                        if way == "merged cold":
                            builds.append(b)
                            build_s += runner.merged.build_seconds[n0:]
                    diffs.append(max(int(np.abs(images[w].astype(np.int16) - images["baked"].astype(np.int16)).max())
                                     for w in WAYS))
            ms = {w: round(statistics.median(v) * 1000, 1) for w, v in times.items()}
            steal1 = _steal_jiffies()
            report["rows"].append({
                "steps": steps, "images": len(times["baked"]), "ms": ms,
                "all_ms": {w: [round(t * 1000, 1) for t in v] for w, v in times.items()},
                "overhead": {w: round(ms[w] / ms["baked"] - 1, 4) for w in WAYS if w != "baked"},
                "paired": {w: _paired(times, w) for w in WAYS[1:]},
                "cpu_ms": {w: round(statistics.median(v) * 1000, 1) for w, v in cpus.items()},
                "all_cpu_ms": {w: [round(t * 1000, 1) for t in v] for w, v in cpus.items()},
                "paired_cpu": {w: _paired(cpus, w) for w in WAYS[1:]},
                "steal_s": None if steal0 is None or steal1 is None
                else round((steal1 - steal0) / os.sysconf("SC_CLK_TCK"), 2),
                "builds_per_request": max(builds) if builds else 0,
                "build_s": round(statistics.median(build_s), 2) if build_s else None,
                "max_pixel_diff": max(diffs), "load": load_average()})
            print(report["rows"][-1], flush=True)
            save()
        runner.merged.wait()  # no build left running once the repositories are deleted
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
