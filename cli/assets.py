"""``craft demo-assets``: the trained toy world (the demo) and tiny / full-size SD 1.5 / SDXL models, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CliError, HelpFormatter, LazyChoices

__all__ = ["register"]

WORLDS = ("all", "toy", "tiny")


def _sizes():
    from craft_reference.tiny import SIZES

    return SIZES


def run(args: argparse.Namespace) -> int:
    from craft_reference.demo import write_demo_assets

    if args.world == "toy" and args.size != "tiny":
        raise CliError(f"--size: the toy world has one size (it is trained); --size {args.size} is for --world tiny")
    out = Path(args.out)
    if args.world in ("all", "tiny"):
        arches = tuple(a.strip() for a in args.arch.split(",") if a.strip())
        write_demo_assets(out, seed=args.seed, size=args.size, arches=arches)
        print(f"random-weight demo assets ({args.size}: {', '.join(arches)}) written to {out}")
    if args.world == "toy" or (args.world == "all" and args.size == "tiny"):
        from craft_toyworld.catalog import committed_craft_loras, write_toy_demo_assets

        recipe = write_toy_demo_assets(out)
        loras = committed_craft_loras()
        print(f"toy world (trained base{', W_init' if (out / 'toy' / 'backbone').is_dir() else ''}, "
              f"LoRAs: {', '.join(loras) or 'none committed'}) written to {out}; recipe {recipe}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo-assets", formatter_class=HelpFormatter,
                       help="write the trained toy world and tiny SD 1.5 / SDXL models, LoRAs and recipes (offline)")
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--world", choices=WORLDS, default="all",
                   help="toy: the trained toy world (toy/, recipe-toy.toml: the demo); tiny: random-weight SD 1.5 / "
                        "SDXL models and LoRAs (recipe-sd15.toml, recipe-sdxl.toml); all: both (with --size full: tiny "
                        "only)")
    p.add_argument("--seed", type=int, default=0, help="seed of every generated weight (random-weight models)")
    p.add_argument("--size", choices=LazyChoices(_sizes), default="tiny", metavar="SIZE",
                   help="tiny demo models, or the public full-size architectures with random weights "
                        "(for engine export and timing; SD 1.5 ~2 GB, SDXL ~7 GB)")
    p.add_argument("--arch", default="sd15,sdxl", help="comma-separated architectures of the random-weight models: "
                                                       "sd15, sdxl")
    p.set_defaults(func=run)
