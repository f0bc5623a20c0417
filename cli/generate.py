"""``craft generate``: images from a server (``--url``) or from the in-process reference (``--local``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import CliError, HelpFormatter, LazyChoices, ProgressBar, save_images, window

__all__ = ["register", "request_from_args"]


def _schedulers():
    from craft_ops.sampling import SCHEDULERS

    return sorted(SCHEDULERS)


def _modes():
    from craft_ops.sampling import MODES

    return list(MODES)


def request_from_args(args: argparse.Namespace):
    """The request flags as a ``craft_ops.request.GenerateRequest`` (None: the recipe's / server's default)."""
    from craft_ops.request import GenerateRequest

    return GenerateRequest(
        prompts=tuple(args.prompt), negative_prompt=args.negative_prompt, content=args.content,
        style=args.style, seed=args.seed, steps=args.steps, guidance=args.guidance,
        height=args.height, width=args.width, gamma_c=args.gamma_c, gamma_s=args.gamma_s,
        mode=args.mode, scheduler=args.scheduler, content_window=args.content_window,
        style_window=args.style_window,
    )


def _generate_local(args: argparse.Namespace, request):
    from craft_reference.pipeline import ReferencePipeline

    pipe = ReferencePipeline.from_recipe(args.recipe)
    for note in pipe.plan(request).notes:
        print(f"note: {note}", file=sys.stderr)
    bar = ProgressBar()
    try:
        return pipe.generate(request, callback=bar)
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    request = request_from_args(args)
    notes, manifest = (), None
    if args.local:
        if not args.recipe:
            raise CliError("--local needs --recipe FILE")
        images = _generate_local(args, request)
    else:
        if not args.url:
            raise CliError("give --url HOST:PORT (served) or --local --recipe FILE (in-process)")
        from .remote import generate_remote

        result = generate_remote(args, request)
        images, notes, manifest = result.images, result.notes, result.manifest
    paths = save_images(images, Path(args.out))
    if args.json:
        print(json.dumps({"images": [str(p) for p in paths], "notes": list(notes), "manifest": manifest}))
        return 0
    for path in paths:
        print(f"wrote {path}")
    if manifest:  # which manifest (sha256 of the replica's manifest.json) served the request
        print(f"manifest: {manifest}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", formatter_class=HelpFormatter,
                       help="generate images (served via --url, or in-process via --local)")
    where = p.add_argument_group("where")
    where.add_argument("--local", action="store_true", help="run the PyTorch reference pipeline in-process")
    where.add_argument("--recipe", help="recipe file (with --local; default: none)")
    where.add_argument("--url", help="server HOST:PORT, or several comma-separated replicas tried in turn (default: none)")
    where.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="how to reach the server")
    where.add_argument("--model", default="craft_pipeline", help="Triton pipeline model name")
    where.add_argument("--stream", action="store_true", help="stream progress from the server (gRPC)")
    what = p.add_argument_group("request (unset: the recipe's [defaults], or the server's)")
    what.add_argument("--prompt", action="append", required=True,
                      help="prompt with <c> / <s> routing tokens; repeat for several images")
    what.add_argument("--negative-prompt", default="", help="text of the unconditional branch (default: empty)")
    what.add_argument("--content", help="content LoRA name (default: none)")
    what.add_argument("--style", help="style LoRA name (default: none)")
    what.add_argument("--seed", type=int, default=0, help="noise seed; prompt k uses SEED + k")
    what.add_argument("--steps", type=int, help="sampling steps (default: the recipe's, 30 if unset)")
    what.add_argument("--guidance", type=float,
                      help="omega of Eq. 11, guidance_scale - 1 (default: the recipe's; 6.5 SD 1.5, 4.0 SDXL)")
    what.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the recipe's; 512 SD 1.5, 1024 SDXL)")
    what.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the recipe's; 512 SD 1.5, 1024 SDXL)")
    what.add_argument("--gamma-c", type=float,
                      help="content gate in [0, 1], a baked value when served (default: 1 with <c> in the prompt, else 0)")
    what.add_argument("--gamma-s", type=float,
                      help="style gate in [0, 1], a baked value when served (default: 1 with <s> in the prompt, else 0)")
    what.add_argument("--mode", choices=LazyChoices(_modes), metavar="MODE",
                      help="acfg: Eq. 10-11; cfg: the same weights on both branches (default: the recipe's, acfg)")
    what.add_argument("--scheduler", choices=LazyChoices(_schedulers), metavar="NAME", help="sampler (default: the recipe's, euler)")
    what.add_argument("--content-window", type=window, metavar="START,END",
                      help="content time gate as trajectory fractions (default: the recipe's, 0.0,0.7)")
    what.add_argument("--style-window", type=window, metavar="START,END",
                      help="style time gate as trajectory fractions (default: the recipe's, 0.28,1.0)")
    p.add_argument("--out", required=True, help="output PNG (several prompts: NAME-<i>.png)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: image paths, notes, and the id of the manifest that served it")
    p.set_defaults(func=run)
