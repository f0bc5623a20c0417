"""``craft toyworld``: the trained toy world (render, judge, list, train, train-judges, train-loras, compare)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .common import CliError, HelpFormatter

__all__ = ["register"]


class _StageBars:
    """One tqdm bar on stderr per stage for ``progress(stage, done, total, losses)``."""

    def __init__(self):
        self.bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int, losses) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            from tqdm.auto import tqdm

            bar = self.bars[stage] = tqdm(total=total, initial=done - 1, desc=stage, file=sys.stderr,
                                          dynamic_ncols=True, leave=True)
        if losses:
            bar.set_postfix(loss=f"{losses['loss']:.4f}")
        bar.update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def run_render(args: argparse.Namespace) -> int:
    from craft_toyworld.world import write_renders

    paths = write_renders(Path(args.out), shape=args.shape, style=args.style, color=args.color, n=args.n,
                          seed=args.seed)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


def run_judge(args: argparse.Namespace) -> int:
    from craft_toyworld.catalog import asset_path
    from craft_toyworld.judges import Judges, load_folder

    files, images = load_folder(Path(args.images), "--images")
    judges = Judges.load(Path(args.judges) if args.judges else asset_path("judges.safetensors"))
    records = [{"image": p.name, **r} for p, r in zip(files, judges(images).records())]
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    for r in records:
        print(f"{r['image']}: {r['shape']} ({r['shape_prob']:.3f}), {r['style']} ({r['style_prob']:.3f})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from craft_toyworld.catalog import list_world

    world = list_world()
    if args.json:
        print(json.dumps(world, indent=1))
        return 0
    held_sh, held_st = set(world["held_out_shapes"]), set(world["held_out_styles"])
    print("shapes: " + ", ".join(s + (" (held out)" if s in held_sh else "") for s in world["shapes"]))
    print("styles: " + ", ".join(s + (" (held out)" if s in held_st else "") for s in world["styles"]))
    print("colors: " + ", ".join(world["colors"]))
    print(f"caption: '{world['caption_example']}'   pair prompt: '{world['pair_prompt']}'")
    print("LoRAs:")
    for lora in world["loras"]:
        mark = "" if lora["present"] else "  [not committed]"
        print(f"  {lora['variant']}/{lora['name']}: {lora['kind']}, token '{lora['token']}', prompt "
              f"'{lora['prompt']}', teaches {lora['teaches']} ({lora['trained_as']}){mark}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from craft_toyworld.train_all import train_world

    bars = _StageBars()
    try:
        out = train_world(Path(args.out), seed=args.seed, quick=args.quick, unet_steps=args.unet_steps,
                          vae_steps=args.vae_steps, judge_steps=args.judge_steps, progress=bars)
    finally:
        bars.close()
    print(f"toy world trained: base in {out / 'base'}, judges in {out / 'judges.safetensors'}")
    return 0


def run_train_judges(args: argparse.Namespace) -> int:
    from craft_toyworld.train_all import train_judges_for

    bars = _StageBars()
    try:
        out = train_judges_for(Path(args.base), Path(args.out), seed=args.seed, steps=args.steps, progress=bars)
    finally:
        bars.close()
    log = json.loads(out.with_name("judges_log.json").read_text())
    acc = log["accuracy_fresh_renders"]
    print(f"judges written to {out}: accuracy on {acc['images']} fresh renders shape {acc['shape']:.3f}, "
          f"style {acc['style']:.3f} (log: {out.with_name('judges_log.json')})")
    return 0


def run_train_loras(args: argparse.Namespace) -> int:
    from craft_toyworld.concepts import LoraSettings, RankFTSettings
    from craft_toyworld.suite import SuiteSettings, train_suite

    lora, rankft = LoraSettings(), RankFTSettings()
    pick = lambda value, default: default if value is None else value  # noqa: E731
    if args.lr is not None and args.lr <= 0:
        raise CliError(f"--lr: must be positive, got {args.lr}")
    settings = SuiteSettings(
        lora=dataclasses.replace(lora, rank=pick(args.rank, lora.rank), steps=pick(args.steps, lora.steps),
                                 lr=pick(args.lr, lora.lr), style_steps=pick(args.style_steps, lora.style_steps)),
        rankft=dataclasses.replace(rankft, steps=pick(args.rankft_steps, rankft.steps)), workers=args.workers)
    bars = _StageBars()
    try:
        suite = train_suite(Path(args.base), Path(args.out), settings, progress=bars)
    finally:
        bars.close()
    print(f"W_init and LoRAs written to {suite.root}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from craft_toyworld.compare import write_comparison

    out = write_comparison(Path(args.out), args.content, args.style, args.seed, n=args.n)
    print(f"CRAFT-LoRA (top row) and direct merge (bottom row), seeds {args.seed}..{args.seed + args.n - 1}: {out}")
    return 0


def register(sub) -> None:
    top = sub.add_parser("toyworld", formatter_class=HelpFormatter,
                         help="the trained toy world: render, judge, list, train (README, 'Toy world')")
    tw = top.add_subparsers(dest="toyworld_command", required=True, metavar="COMMAND")

    p = tw.add_parser("render", formatter_class=HelpFormatter, help="write ground-truth PNGs (LoRA training sets)")
    p.add_argument("--shape", help="one shape (default: any shape)")
    p.add_argument("--style", help="one style (default: any style)")
    p.add_argument("--color", help="one colour (default: any colour)")
    p.add_argument("--n", type=_positive, default=8, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="stream of scenes: the same seed gives the same images")
    p.add_argument("--out", required=True, help="folder to write PNGs into")
    p.set_defaults(func=run_render)

    p = tw.add_parser("judge", formatter_class=HelpFormatter, help="predicted shape and style of every image")
    p.add_argument("--images", required=True, help="folder of PNG / JPEG images (resized to 64 px)")
    p.add_argument("--judges", help="judges .safetensors (default: the committed ones)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=run_judge)

    p = tw.add_parser("list", formatter_class=HelpFormatter, help="shapes, styles, held-out ones, committed LoRAs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_list)

    p = tw.add_parser("train", formatter_class=HelpFormatter,
                      help="train the base (VAE + UNet) and the judges from scratch (the committed ones' settings)")
    p.add_argument("--out", required=True, help="folder: OUT/base/, OUT/judges.safetensors")
    p.add_argument("--seed", type=int, default=0, help="seed of data, weights and noise")
    p.add_argument("--unet-steps", type=_positive, help="UNet steps (default: the committed base's)")
    p.add_argument("--vae-steps", type=_positive, help="VAE steps (default: the committed base's)")
    p.add_argument("--judge-steps", type=_positive, help="judge steps (default: the committed judges')")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test, not a model)")
    p.set_defaults(func=run_train)

    p = tw.add_parser("train-judges", formatter_class=HelpFormatter,
                      help="train only the judges, with the VAE of a trained base")
    p.add_argument("--base", required=True, help="trained base folder (its VAE round trips are in the data)")
    p.add_argument("--out", required=True, help="the .safetensors file to write (judges_log.json beside it)")
    p.add_argument("--seed", type=int, default=0, help="seed of data and weights")
    p.add_argument("--steps", type=_positive, help="optimiser steps (default: the committed judges')")
    p.set_defaults(func=run_train_judges)

    p = tw.add_parser("train-loras", formatter_class=HelpFormatter,
                      help="Rank-FT backbone (W_init) and the benchmark's content / style LoRAs on a base")
    p.add_argument("--base", required=True, help="trained base folder")
    p.add_argument("--out", required=True, help="suite folder: images/, refs/, backbone/, loras/<set>/")
    p.add_argument("--rank", type=_positive, help="LoRA rank (default: the committed LoRAs')")
    p.add_argument("--steps", type=_positive, help="content LoRA steps (default: the committed LoRAs')")
    p.add_argument("--style-steps", type=_positive, help="style LoRA steps (default: the committed LoRAs')")
    p.add_argument("--lr", type=float, help="LoRA learning rate (default: the committed LoRAs')")
    p.add_argument("--rankft-steps", type=_positive, help="Rank-FT steps (default: the committed backbone's)")
    p.add_argument("--workers", type=_positive, default=1,
                   help="processes of one torch thread each training jobs at once (progress bars only with 1)")
    p.set_defaults(func=run_train_loras)

    p = tw.add_parser("compare", formatter_class=HelpFormatter,
                      help="CRAFT-LoRA next to a direct merge of the committed LoRAs, same seeds (one PNG)")
    p.add_argument("--content", default="star", help="held-out shape (content LoRA)")
    p.add_argument("--style", default="checker", help="held-out style (style LoRA)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--n", type=_positive, default=4, help="seeds (columns)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=run_compare)

