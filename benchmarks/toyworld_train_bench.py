"""Wall time of ``craft toyworld train`` at its defaults (the committed base's recipe), per stage.

    .venv/bin/python benchmarks/toyworld_train_bench.py --work DIR [--report-only]

Runs the command as a user would (a subprocess, torch's default threads), then reads the
``train_log.json`` of the base and ``judges_log.json`` it wrote and records wall and CPU seconds
per stage, the load average before and after, and the final losses beside the committed base's.
Then it checks that the fresh base learned what the committed one did: both draw ``--images``
base-world captions (``a red circle with stripes``, base shapes x base styles, scenes of seed 4242),
20 Euler steps, and the committed judges score shape and style against the caption.
Writes ``results/toyworld-train-<machine>-<date>.json`` / ``.md``. The issue's aim: the base in
<= 60 min on 2 cores. ``--report-only`` re-reads a finished ``--work`` folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, report_start, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "toyworld" / "assets"
COMMITTED = ASSETS / "base" / "train_log.json"


def base_accuracy(base: Path, n: int, seed: int = 4242) -> dict:
    """Shape / style / both accuracy of ``n`` base-world captions drawn by ``base`` (committed judges)."""
    import numpy as np
    import torch

    from craft_ops.request import GenerateRequest
    from craft_toyworld.judges import Judges
    from craft_toyworld.methods import build_pipeline
    from craft_toyworld.world import BASE_SHAPES, BASE_STYLES, full_caption, sample_scene

    torch.set_num_threads(2)
    scenes = [sample_scene(seed, i, shapes=BASE_SHAPES, styles=BASE_STYLES) for i in range(n)]
    pipe = build_pipeline(base, None, {}, routed=True)
    prompts = [full_caption(s) for s in scenes]
    images = np.concatenate([pipe.generate(GenerateRequest(prompts=tuple(prompts[k:k + 64]), seed=k, steps=20))
                             for k in range(0, n, 64)])  # 64 prompts per request at most
    verdict = Judges.load(ASSETS / "judges.safetensors")(images)
    shape = [verdict.shape(i) == s.shape for i, s in enumerate(scenes)]
    style = [verdict.style(i) == s.style for i, s in enumerate(scenes)]
    return {"images": n, "shape": sum(shape) / n, "style": sum(style) / n,
            "both": sum(a and b for a, b in zip(shape, style)) / n, "shape_ok": shape, "style_ok": style}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="output folder of the training run")
    ap.add_argument("--report-only", action="store_true", help="only read a finished run in --work")
    ap.add_argument("--images", type=int, default=128, help="captions drawn by each base for the quality check")
    args = ap.parse_args(argv)
    out, report = report_start("toyworld_train")
    command = [str(Path(sys.executable).parent / "craft"), "toyworld", "train", "--out", str(args.work)]
    run_file = args.work / "bench_run.json"  # wall time and checkout of the run, for --report-only
    if not args.report_only:
        t0 = time.perf_counter()
        subprocess.run(command, check=True)
        run_file.write_text(json.dumps({"command_wall_s": round(time.perf_counter() - t0, 1), "git": report["git"]}))
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    wall = run.get("command_wall_s")
    base = json.loads((args.work / "base" / "train_log.json").read_text())
    judges = json.loads((args.work / "judges_log.json").read_text())
    committed = json.loads(COMMITTED.read_text())
    sec = {k: round(float(v), 1) for k, v in base["seconds"].items()}
    judge_s = round(float(judges.get("seconds_with_accuracy", judges["seconds"])), 1)
    report.update({
        "command": " ".join(["craft", *command[1:]]), "threads": base["threads"],
        "seconds": {**sec, "judges": judge_s}, "cpu_seconds": {k: round(float(v), 1) for k, v in base["cpu_seconds"].items()},
        "command_wall_s": wall, "training_git": run.get("git"), "load_average_end": load_average(),
        "base_load_average": [base["load_average_start"], base["load_average_end"]],
        "config": base["config"], "final_loss": {"vae": base["vae_loss"][-1], "unet": base["unet_loss"][-1]},
        "committed_final_loss": {"vae": committed["vae_loss"][-1], "unet": committed["unet_loss"][-1]},
        "judges_accuracy_fresh_renders": judges.get("accuracy_fresh_renders"),
        "drawn_accuracy": {"this_run": base_accuracy(args.work / "base", args.images),
                           "committed": base_accuracy(ASSETS / "base", args.images)},
    })
    acc = report["drawn_accuracy"]
    agree = {k: sum(a == b for a, b in zip(acc["this_run"][f"{k}_ok"], acc["committed"][f"{k}_ok"]))
             for k in ("shape", "style")}
    report["verdicts_agreeing"] = agree
    minutes = sec["total"] / 60
    md = "\n".join([
        f"# `craft toyworld train` at its defaults ({report['date']}, {report['machine']}, {report['cpus']} cpus)",
        "",
        "| stage | wall s | CPU s |", "|---|---|---|",
        *[f"| {k} | {sec[k]} | {report['cpu_seconds'].get(k, '')} |" for k in ("render", "vae", "unet", "total")],
        f"| judges | {judge_s} | |",
        "",
        f"Base: **{minutes:.1f} min** (aim <= 60); whole command: "
        f"{'n/a' if wall is None else f'{wall / 60:.1f} min'}. Commit {(run.get('git') or {}).get('commit', '?')[:7]}, "
        f"threads {base['threads']}; load average "
        f"{report['base_load_average'][0]} -> {report['base_load_average'][1]}.",
        f"Final thinned losses: VAE {report['final_loss']['vae']:.4f}, UNet {report['final_loss']['unet']:.4f} "
        f"(committed base: {report['committed_final_loss']['vae']:.4f} / {report['committed_final_loss']['unet']:.4f}).",
        f"Judges on 1000 fresh renders: {report['judges_accuracy_fresh_renders']}.", "",
        f"{args.images} base-world captions (seed 4242 scenes, 20 Euler steps) drawn by each base, scored by the "
        "committed judges:", "",
        "| base | shape | style | both |", "|---|---|---|---|",
        *[f"| {k.replace('_', ' ')} | {a['shape']:.3f} | {a['style']:.3f} | {a['both']:.3f} |" for k, a in acc.items()],
        "", f"The two bases' verdicts agree on {agree['shape']} of {args.images} images (shape) and {agree['style']} "
        "(style): two different models, scored alike.", "",
    ])
    write_report(report, out, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
