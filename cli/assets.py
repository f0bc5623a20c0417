"""``craft demo-assets``: tiny (or full-size) SD 1.5 / SDXL models, demo LoRAs and recipes, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import HelpFormatter, LazyChoices

__all__ = ["register"]


def _sizes():
    from craft_reference.tiny import SIZES

    return SIZES


def run(args: argparse.Namespace) -> int:
    from craft_reference.demo import write_demo_assets

    arches = tuple(a.strip() for a in args.arch.split(",") if a.strip())
    out = write_demo_assets(Path(args.out), seed=args.seed, size=args.size, arches=arches)
    print(f"demo assets ({args.size}: {', '.join(arches)}) written to {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo-assets", formatter_class=HelpFormatter,
                       help="write tiny SD 1.5 / SDXL models, demo LoRAs and recipes (offline)")
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--seed", type=int, default=0, help="seed of every generated weight")
    p.add_argument("--size", choices=LazyChoices(_sizes), default="tiny", metavar="SIZE",
                   help="tiny demo models, or the public full-size architectures with random weights "
                        "(for engine export and timing; SD 1.5 ~2 GB, SDXL ~7 GB)")
    p.add_argument("--arch", default="sd15,sdxl", help="comma-separated architectures: sd15, sdxl")
    p.set_defaults(func=run)
