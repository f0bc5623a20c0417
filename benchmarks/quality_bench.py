"""Quality benchmark: does CRAFT-LoRA keep a content and a style better than merging LoRAs directly?

On the trained toy world (``craft_toyworld``): train the Rank-FT backbone and 4 x 4 LoRAs
(routed / all-layer, on W_init / W0) on the committed base, then for every held-out content x
held-out style pair sample the same seeds with every method of
:data:`craft_toyworld.methods.METHODS` through the project's reference pipeline, and score
each image with the judges (content score = P(target shape), style score = P(target style),
both correct, CLIP-I analogues). Writes ``quality-<machine>-<date>.json`` (per method and per
pair: mean and 95 % interval of every metric, the seeds), the markdown table and a contact
sheet PNG (rows = methods, columns = seeds, one block per pair) to ``--results``.

Seeds: evaluation uses ``--seed-start`` (default 1000) onwards; ``--tune`` switches to the
tuning seeds 0.. and marks the report as a tuning run (settings were only ever chosen on those).

    .venv/bin/python benchmarks/quality_bench.py                  # the full benchmark (the report records its seconds)
    .venv/bin/python benchmarks/quality_bench.py --quick --results /tmp/q   # harness check (tiny counts)
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS, cpu_model, git_state, load_average, machine_slug, write_report  # benchmarks/ is on sys.path

from craft_toyworld.catalog import ASSETS, sampling_defaults  # noqa: E402
from craft_toyworld.concepts import CONCEPTS, LORA_SETS, LoraSettings, RankFTSettings  # noqa: E402
from craft_toyworld.evaluate import reference_features, score_images, summarise  # noqa: E402
from craft_toyworld.judges import Judges  # noqa: E402
from craft_toyworld.methods import METHODS, Method, SampleSettings, build_pipeline, sample_images  # noqa: E402
from craft_toyworld.suite import Suite, SuiteSettings, train_suite  # noqa: E402

log = logging.getLogger("quality_bench")

QUICK = dict(seeds=2, steps=4, lora_steps=3, lora_style_steps=3, rankft_steps=2, pairs=1, workers=1)  # workers: no spawn imports
TUNING_SEED_START = 0


def _args(argv=None) -> argparse.Namespace:
    d = sampling_defaults()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny counts: a test of the harness, not a measurement")
    p.add_argument("--base", type=Path, default=ASSETS / "base")
    p.add_argument("--judges", type=Path, default=ASSETS / "judges.safetensors")
    p.add_argument("--work", type=Path, help="where the LoRAs and W_init go (default: a temporary folder)")
    p.add_argument("--suite", type=Path, help="reuse a trained suite folder (`craft toyworld train-loras` output) instead of training")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--seed-start", type=int, default=1000)
    p.add_argument("--tune", action="store_true", help="use the tuning seeds (0..) and mark the report as tuning")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--omega", type=float, default=d["omega"])
    p.add_argument("--lora-steps", type=int, default=LoraSettings.steps, help="steps of the content LoRAs")
    p.add_argument("--lora-style-steps", type=int, default=LoraSettings.style_steps, help="steps of the style LoRAs")
    p.add_argument("--lora-rank", type=int, default=LoraSettings.rank)
    p.add_argument("--lora-lr", type=float, default=LoraSettings.lr)
    p.add_argument("--rankft-steps", type=int, default=RankFTSettings.steps)
    p.add_argument("--r-max", type=int, default=RankFTSettings.r_max)
    p.add_argument("--r-min", type=int, default=RankFTSettings.r_min)
    p.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    p.add_argument("--pairs", type=int, help="only the first N content x style pairs")
    p.add_argument("--sheet-seeds", type=int, default=8, help="seeds per row of the contact sheet")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--workers", type=int, default=2,
                   help="processes (one torch thread each) for LoRA training and sampling; 1 = all in this process")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k.replace("-", "_"), v)
    if args.tune:
        args.seed_start = TUNING_SEED_START
    return args


def _pairs(limit: int | None) -> list[tuple[str, str]]:
    contents = [c.name for c in CONCEPTS if c.kind == "content"]
    styles = [c.name for c in CONCEPTS if c.kind == "style"]
    pairs = [(c, s) for c in contents for s in styles]
    return pairs[:limit] if limit else pairs


def _suite(args, pairs, methods, work: Path) -> tuple[Suite, float]:
    if args.suite:
        return Suite(args.suite), 0.0
    names = tuple(dict.fromkeys(n for pair in pairs for n in pair))
    settings = SuiteSettings(
        sets=tuple(s for s in LORA_SETS if any(m.loras == s for m in methods)),
        lora=LoraSettings(rank=args.lora_rank, steps=args.lora_steps, lr=args.lora_lr, style_steps=args.lora_style_steps),
        rankft=RankFTSettings(r_max=args.r_max, r_min=args.r_min, steps=args.rankft_steps, evaluate=not args.quick),
        concepts=names, images_per_concept=4 if args.quick else 12, refs_per_concept=2 if args.quick else 5,
        workers=args.workers,
    )
    t = time.perf_counter()
    suite = train_suite(args.base, work, settings)
    return suite, time.perf_counter() - t


def _sample_group(base: Path, backbone: Path, suite_root: Path, settings: SampleSettings, names: list[str],
                  pairs, seeds, threads: int) -> dict:
    """Images of the methods ``names`` (one pipeline: same LoRA set, backbone and routing)."""
    torch.set_num_threads(threads)
    suite, methods = Suite(suite_root), [m for m in METHODS if m.name in names]
    m0 = methods[0]
    loras = {c.name: (c.kind, suite.lora(m0.loras, c.name)) for c in CONCEPTS if suite.lora(m0.loras, c.name).is_file()}
    pipe = build_pipeline(base, backbone if m0.backbone else None, loras, routed=m0.routed, settings=settings,
                          max_batch=max(len(seeds), 1))
    images, alone = {}, {}
    for m in methods:
        for content, style in pairs:
            # the "alone" methods do not depend on the other half of the pair: sample them once
            used = {"pair": (content, style), "content": (content,), "style": (style,)}[m.uses]
            if (m.name, used) not in alone:
                alone[m.name, used] = sample_images(pipe, m, content, style, seeds)
            images[m.name, content, style] = alone[m.name, used]
    return images


def _sample_all(args, suite: Suite, methods: list[Method], pairs, seeds) -> dict:
    """(method, content, style) -> images; one pipeline per (LoRA set, backbone, routing), spread over
    ``--workers`` spawned one-thread processes (the groups are independent, so the images do not depend on it)."""
    settings = replace(SampleSettings.from_dict(sampling_defaults()), steps=args.steps, omega=args.omega)
    images = {}
    if args.workers <= 1:
        groups: dict[tuple, list[str]] = {}
        for m in methods:
            groups.setdefault((m.loras, m.backbone, m.routed), []).append(m.name)
        for names in groups.values():
            images.update(_sample_group(args.base, suite.backbone, suite.root, settings, names, pairs, seeds,
                                        torch.get_num_threads()))
        return images
    # one job per method (each builds its pipeline), longest first, so the workers finish close together
    runs = {m.name: len({"pair": pairs, "content": {p[0] for p in pairs}, "style": {p[1] for p in pairs}}[m.uses])
            for m in methods}
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_sample_group, args.base, suite.backbone, suite.root, settings, [name], pairs, seeds, 1)
                   for name in sorted(runs, key=lambda n: -runs[n])]
        for future in futures:
            images.update(future.result())
    return images


def _contact_sheet(images: dict, methods, pairs, n: int, path: Path) -> None:
    from PIL import Image, ImageDraw

    label_w, px, pad = 190, 64, 2
    rows = len(methods) * len(pairs) + len(pairs)
    sheet = Image.new("RGB", (label_w + n * (px + pad), rows * (px + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for content, style in pairs:
        draw.text((4, y + 24), f"{content} (content) x {style} (style), seeds {n} first", fill="black")
        y += px + pad
        for m in methods:
            draw.text((4, y + 26), m.label, fill="black")
            for k, img in enumerate(images[m.name, content, style][:n]):
                sheet.paste(Image.fromarray(img), (label_w + k * (px + pad), y))
            y += px + pad
    sheet.save(path)


def _markdown(report: dict, methods) -> str:
    def cell(s: dict) -> str:
        return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"

    lines = [f"# Toy-world quality benchmark{' (quick harness run)' if report['quick'] else ''}"
             f"{' (TUNING seeds)' if report['tuning'] else ''}", "",
             f"{len(report['pairs'])} content x style pairs x {len(report['seeds'])} seeds "
             f"(seeds {report['seeds'][0]}..{report['seeds'][-1]}), {report['settings']['steps']} Euler steps, "
             f"omega {report['settings']['omega']}; mean [95 % interval].", "",
             "| method | content score | style score | both correct | content CLIP-I* | style CLIP-I* |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        s = report["methods"][m.name]["all"]
        sims = [cell(s[k]) if k in s else "-" for k in ("content_sim", "style_sim")]
        lines.append(f"| {m.label} | {cell(s['content_score'])} | {cell(s['style_score'])} | "
                     f"{cell(s['both_correct'])} | {sims[0]} | {sims[1]} |")
    craft, direct = report["methods"].get("craft"), report["methods"].get("direct_merge")
    if craft and direct:
        gap = {k: craft["all"][k]["mean"] - direct["all"][k]["mean"] for k in ("content_score", "style_score")}
        lines += ["", f"CRAFT-LoRA - direct merge: content {gap['content_score']:+.3f}, style {gap['style_score']:+.3f}"]
    lines += ["", "*cosine of the judges' penultimate features to the mean feature of the LoRA's training images.",
              "Scores are judge probabilities of the target shape / style (the paper's CLIP-I role); "
              "alone rows use each LoRA's own prompt.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    logging.basicConfig(level=logging.WARNING)
    t0, load_start = time.perf_counter(), load_average()
    pairs = _pairs(args.pairs)
    methods = [m for m in METHODS if not args.methods or m.name in args.methods.split(",")]
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    judges = Judges.load(args.judges)
    with tempfile.TemporaryDirectory(prefix="quality-bench-") as tmp:
        # 1. backbone and LoRAs
        suite, train_s = _suite(args, pairs, methods, args.work or Path(tmp))
        # 2. sampling
        t = time.perf_counter()
        images = _sample_all(args, suite, methods, pairs, seeds)
        sample_s = time.perf_counter() - t
        # 3. judging
        refs = {c.name: reference_features(judges, suite.images(c.name), c.kind) for c in CONCEPTS
                if suite.images(c.name).is_dir()}
        report_methods = {}
        for m in methods:
            pooled, per_pair = {}, {}
            for content, style in pairs:
                scores = score_images(judges, images[m.name, content, style], content, style,
                                      refs.get(content), refs.get(style))
                per_pair[f"{content}+{style}"] = {**summarise(scores), "predicted_shape": scores["predicted_shape"],
                                                  "predicted_style": scores["predicted_style"]}
                for k, v in scores.items():
                    pooled.setdefault(k, []).extend(v)
            report_methods[m.name] = {"label": m.label, "all": summarise(pooled), "pairs": per_pair,
                                      "how": {"loras": m.loras, "backbone": "W_init" if m.backbone else "W0",
                                              "routed": m.routed, "mode": m.mode, "time_gates": m.time_gates,
                                              "prompt": m.prompt()}}
        # 4. report
        slug = f"quality{'-quick' if args.quick else ''}{'-tune' if args.tune else ''}{args.tag}-{machine_slug()}-{dt.date.today()}"
        args.results.mkdir(parents=True, exist_ok=True)
        _contact_sheet(images, methods, pairs, min(args.sheet_seeds, len(seeds)), args.results / f"{slug}.png")
    report = {
        "quick": args.quick, "tuning": args.tune, "pairs": [list(p) for p in pairs], "seeds": seeds,
        "settings": {"steps": args.steps, "omega": args.omega, "scheduler": "euler",
                     "content_window": sampling_defaults()["content_window"],
                     "style_window": sampling_defaults()["style_window"], "workers": args.workers,
                     "lora_targets": list(LoraSettings.targets), "lora_batch": LoraSettings.batch_size, "lora_steps": args.lora_steps, "lora_style_steps": args.lora_style_steps,
                     "lora_rank": args.lora_rank, "lora_lr": args.lora_lr, "rankft_steps": args.rankft_steps,
                     "r_max": args.r_max, "r_min": args.r_min, "base": str(args.base), "suite": str(args.suite or "")},
        "methods": report_methods,
        "seconds": {"train": train_s, "sample": sample_s, "total": time.perf_counter() - t0},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_start": load_start, "load_average_end": load_average()},
        "git": git_state(),
    }
    write_report(report, args.results / f"{slug}.json", _markdown(report, methods),
                 note=f" and {args.results / (slug + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
