"""``craft``: the one command users meet. Subcommands import their heavy modules lazily."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "CliError"]

log = logging.getLogger("craft")


class CliError(Exception):
    """A user-facing error: printed as ``craft: error: ...`` and exit code 2, no traceback."""


def _window(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"window must be 'START,END' fractions, got {text!r}") from exc
    return a, b


# -- subcommands -----------------------------------------------------------------------------


def _cmd_demo_assets(args: argparse.Namespace) -> int:
    from craft_reference.demo import write_demo_assets

    arches = tuple(a.strip() for a in args.arch.split(",") if a.strip())
    out = write_demo_assets(Path(args.out), seed=args.seed, size=args.size, arches=arches)
    print(f"demo assets ({args.size}: {', '.join(arches)}) written to {out}")
    return 0


def _request_from_args(args: argparse.Namespace):
    from craft_ops.request import GenerateRequest

    return GenerateRequest(
        prompts=tuple(args.prompt), negative_prompt=args.negative_prompt, content=args.content,
        style=args.style, seed=args.seed, steps=args.steps, guidance=args.guidance,
        height=args.height, width=args.width, gamma_c=args.gamma_c, gamma_s=args.gamma_s,
        mode=args.mode, scheduler=args.scheduler, content_window=args.content_window,
        style_window=args.style_window,
    )


def _save_images(images, out: Path) -> list[Path]:
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path)
    return paths


def _cmd_generate(args: argparse.Namespace) -> int:
    request = _request_from_args(args)
    if args.local:
        if not args.recipe:
            raise CliError("--local needs --recipe FILE")
        from craft_export.recipe import load_recipe
        from craft_reference.pipeline import ReferencePipeline

        pipe = ReferencePipeline.from_recipe(load_recipe(args.recipe))
        for note in pipe.plan(request).notes:
            print(f"note: {note}", file=sys.stderr)
        images = pipe.generate(request)
    else:
        if not args.url:
            raise CliError("give --url HOST:PORT (served) or --local --recipe FILE (in-process)")
        from .remote import generate_remote

        images = generate_remote(args, request)
    for path in _save_images(images, Path(args.out)):
        print(f"wrote {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from craft_export.exporter import run_export_cli

    return run_export_cli(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from craft_serving.serve import run_serve_cli

    return run_serve_cli(args)


def _cmd_models(args: argparse.Namespace) -> int:
    from .remote import run_models_cli

    return run_models_cli(args)


def _cmd_train_backbone(args: argparse.Namespace) -> int:
    from craft_training.common import run_train_backbone_cli

    return run_train_backbone_cli(args)


def _cmd_train_lora(args: argparse.Namespace) -> int:
    from craft_training.common import run_train_lora_cli

    return run_train_lora_cli(args)


# -- parser ------------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images (served via --url, or in-process via --local)")
    where = p.add_argument_group("where")
    where.add_argument("--local", action="store_true", help="run the PyTorch reference pipeline in-process")
    where.add_argument("--recipe", help="recipe file (with --local)")
    where.add_argument("--url", help="server HOST:PORT")
    where.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    where.add_argument("--model", default="craft_pipeline", help="Triton pipeline model name")
    where.add_argument("--stream", action="store_true", help="stream progress from the server")
    what = p.add_argument_group("request")
    what.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several")
    what.add_argument("--negative-prompt", default="")
    what.add_argument("--content", help="content LoRA name")
    what.add_argument("--style", help="style LoRA name")
    what.add_argument("--seed", type=int, default=0)
    what.add_argument("--steps", type=int)
    what.add_argument("--guidance", type=float, help="omega of Eq. 11 (guidance_scale - 1)")
    what.add_argument("--height", type=int)
    what.add_argument("--width", type=int)
    what.add_argument("--gamma-c", type=float)
    what.add_argument("--gamma-s", type=float)
    what.add_argument("--mode", choices=("acfg", "cfg"))
    what.add_argument("--scheduler")
    what.add_argument("--content-window", type=_window, metavar="START,END")
    what.add_argument("--style-window", type=_window, metavar="START,END")
    p.add_argument("--out", required=True, help="output PNG (several prompts: NAME-<i>.png)")
    p.set_defaults(func=_cmd_generate)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="recipe -> baked UNet variants -> ONNX/TensorRT -> Triton model repository")
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True, help="model repository folder")
    p.add_argument("--runtime", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--pairs", default="all", help="'all' or NAME+NAME,... content+style pairs")
    p.add_argument("--runner", choices=("auto", "native", "python"), default="auto",
                   help="engine models: native Triton backends or Python-backend runners")
    p.add_argument("--keep-onnx", action="store_true",
                   help="tensorrt: keep every UNet variant's ONNX file (by default only W_init's stays)")
    p.add_argument("--json", action="store_true", help="print one JSON summary line")
    p.set_defaults(func=_cmd_export)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run tritonserver on a model repository")
    p.add_argument("--repo", required=True)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    p.add_argument("--log-file", help="server log file (default: REPO/../tritonserver.log)")
    p.set_defaults(func=_cmd_serve)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the LoRAs and defaults a server offers")
    p.add_argument("--url", required=True)
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model", default="craft_pipeline")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_models)


def _add_training(sub) -> None:
    p = sub.add_parser("train-backbone", help="Rank-FT: train the W_init backbone (Eq. 1-4)")
    p.add_argument("--base", required=True)
    p.add_argument("--content-images", required=True)
    p.add_argument("--style-images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--r-max", type=int, default=128)
    p.add_argument("--r-min", type=int, default=4)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--sigma", type=float, default=0.35)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=_cmd_train_backbone)

    p = sub.add_parser("train-lora", help="train a routed content/style LoRA on W_init (Eq. 6-7)")
    p.add_argument("--base", required=True)
    p.add_argument("--backbone")
    p.add_argument("--images", required=True)
    p.add_argument("--kind", choices=("content", "style"), required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--routing", default=None, help="routing preset (default: the architecture's)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train_lora)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="craft", description="CRAFT-LoRA content/style personalisation: export, serve, generate")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-assets", help="write tiny SD 1.5 / SDXL models, demo LoRAs and recipes (offline)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="tiny demo models, or the public full-size architectures with random weights "
                        "(for engine export and timing; SD 1.5 ~2 GB, SDXL ~7 GB)")
    p.add_argument("--arch", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    p.set_defaults(func=_cmd_demo_assets)
    for add in (_add_generate, _add_export, _add_serve, _add_models, _add_training):
        add(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, printed without a traceback."""
    return (CliError, ValueError, FileNotFoundError, PermissionError, KeyError)


def _quiet_libraries(verbose: bool) -> None:
    """Keep diffusers / transformers progress bars and advice out of the CLI output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "info" if verbose else "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"craft: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("craft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
