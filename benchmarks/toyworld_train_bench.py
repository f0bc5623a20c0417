"""Wall time of ``craft toyworld train`` at its defaults (the committed base's recipe), per stage.

    .venv/bin/python benchmarks/toyworld_train_bench.py --work DIR [--report-only]

Runs the command as a user would (a subprocess, torch's default threads), then reads the
``train_log.json`` of the base and ``judges_log.json`` it wrote and records wall and CPU seconds
per stage, the load average before and after, and the final losses beside the committed base's.
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
COMMITTED = ROOT / "toyworld" / "assets" / "base" / "train_log.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="output folder of the training run")
    ap.add_argument("--report-only", action="store_true", help="only read a finished run in --work")
    args = ap.parse_args(argv)
    out, report = report_start("toyworld_train")
    command = [str(Path(sys.executable).parent / "craft"), "toyworld", "train", "--out", str(args.work)]
    wall = None
    if not args.report_only:
        t0 = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - t0
    base = json.loads((args.work / "base" / "train_log.json").read_text())
    judges = json.loads((args.work / "judges_log.json").read_text())
    committed = json.loads(COMMITTED.read_text())
    sec = {k: round(float(v), 1) for k, v in base["seconds"].items()}
    judge_s = round(float(judges.get("seconds_with_accuracy", judges["seconds"])), 1)
    report.update({
        "command": " ".join(["craft", *command[1:]]), "threads": base["threads"],
        "seconds": {**sec, "judges": judge_s}, "cpu_seconds": {k: round(float(v), 1) for k, v in base["cpu_seconds"].items()},
        "command_wall_s": None if wall is None else round(wall, 1), "load_average_end": load_average(),
        "base_load_average": [base["load_average_start"], base["load_average_end"]],
        "config": base["config"], "final_loss": {"vae": base["vae_loss"][-1], "unet": base["unet_loss"][-1]},
        "committed_final_loss": {"vae": committed["vae_loss"][-1], "unet": committed["unet_loss"][-1]},
        "judges_accuracy_fresh_renders": judges.get("accuracy_fresh_renders"),
    })
    minutes = sec["total"] / 60
    md = "\n".join([
        f"# `craft toyworld train` at its defaults ({report['date']}, {report['machine']}, {report['cpus']} cpus)",
        "",
        "| stage | wall s | CPU s |", "|---|---|---|",
        *[f"| {k} | {sec[k]} | {report['cpu_seconds'].get(k, '')} |" for k in ("render", "vae", "unet", "total")],
        f"| judges | {judge_s} | |",
        "",
        f"Base: **{minutes:.1f} min** (aim <= 60); whole command: "
        f"{'n/a' if wall is None else f'{wall / 60:.1f} min'}. Threads {base['threads']}; load average "
        f"{report['base_load_average'][0]} -> {report['base_load_average'][1]}.",
        f"Final thinned losses: VAE {report['final_loss']['vae']:.4f}, UNet {report['final_loss']['unet']:.4f} "
        f"(committed base: {report['committed_final_loss']['vae']:.4f} / {report['committed_final_loss']['unet']:.4f}).",
        f"Judges on 1000 fresh renders: {report['judges_accuracy_fresh_renders']}.", "",
    ])
    write_report(report, out, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
