"""``craft train-backbone`` (Rank-FT, Eq. 1-4) and ``craft train-lora`` (routed LoRAs, Eq. 6-7)."""

from __future__ import annotations

import argparse
import sys

from craft_training.config import MIXED_PRECISIONS, RANKFT_OBJECTIVES, BackboneConfig, LoraTrainConfig

from .common import HelpFormatter, LazyChoices, dataclass_default

__all__ = ["register"]


class _Bar:
    """A tqdm bar on stderr for ``progress(done, total, losses)``, opened on the first step (a resumed
    run starts part-way)."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def __call__(self, done: int, total: int, losses) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done - 1, desc=self.desc, file=sys.stderr, dynamic_ncols=True,
                            leave=True)
        self.bar.set_postfix(loss=f"{losses['loss']:.4f}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_backbone(args: argparse.Namespace) -> int:
    """Rank-FT: writes ``OUT/unet``, ``OUT/bases.safetensors``, ``OUT/train_log.json``."""
    from craft_training.backbone import train_backbone

    config = BackboneConfig(
        base=args.base, content_images=args.content_images, style_images=args.style_images, out=args.out,
        r_max=args.r_max, r_min=args.r_min, steps=args.steps, lr=args.lr, resolution=args.resolution,
        sigma=args.sigma, batch_size=args.batch_size, mixed_precision=args.mixed_precision, seed=args.seed,
        checkpoint_every=args.checkpoint_every, resume=args.resume, objective=args.objective,
    )
    bar = _Bar("rank-ft")
    try:
        result = train_backbone(config, progress=bar)
    finally:
        bar.close()
    print(f"W_init backbone written to {result.out} ({result.steps} steps, "
          f"eval loss {result.eval_start:.5f} -> {result.eval_end:.5f})")
    return 0


def run_lora(args: argparse.Namespace) -> int:
    """Routed DreamBooth LoRA on W_init, written as PEFT safetensors."""
    from craft_training.lora import train_lora

    config = LoraTrainConfig(
        base=args.base, backbone=args.backbone, images=args.images, kind=args.kind, prompt=args.prompt,
        out=args.out, rank=args.rank, steps=args.steps, lr=args.lr, resolution=args.resolution,
        routing=args.routing, mixed_precision=args.mixed_precision, seed=args.seed,
    )
    bar = _Bar(f"lora-{config.kind}")
    try:
        result = train_lora(config, progress=bar)
    finally:
        bar.close()
    print(f"{result.kind} LoRA written to {result.out} ({len(result.modules)} modules in "
          f"{'I_c' if result.kind == 'content' else 'I_s'}, final loss {result.final_loss:.5f})")
    return 0


def _presets():
    from craft_ops.routing import PRESETS

    return sorted(PRESETS)


def register(sub) -> None:
    b = lambda name: dataclass_default(BackboneConfig, name)  # noqa: E731 - the library's defaults
    p = sub.add_parser("train-backbone", formatter_class=HelpFormatter,
                       help="Rank-FT: train the W_init backbone (Eq. 1-4)")
    p.add_argument("--base", required=True, help="diffusers folder of the base model (SD 1.5 or SDXL)")
    p.add_argument("--content-images", required=True, help="folder of PNG / JPEG content references")
    p.add_argument("--style-images", required=True, help="folder of PNG / JPEG style references")
    p.add_argument("--out", required=True, help="output folder: unet/, bases.safetensors, train_log.json, checkpoint/")
    p.add_argument("--r-max", type=int, default=b("r_max"), help="rank of the first layer (Eq. 2)")
    p.add_argument("--r-min", type=int, default=b("r_min"), help="rank of the last layer (Eq. 2)")
    p.add_argument("--steps", type=int, default=b("steps"), help="optimiser steps")
    p.add_argument("--lr", type=float, default=b("lr"), help="AdamW learning rate of the bases")
    p.add_argument("--resolution", type=int, default=b("resolution"), help="training image size, a multiple of 8")
    p.add_argument("--sigma", type=float, default=b("sigma"),
                   help="low-pass standard deviation as a fraction of Nyquist (content / style split)")
    p.add_argument("--batch-size", type=int, default=b("batch_size"), help="content x style pairs per step")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=b("mixed_precision"),
                   help="UNet compute dtype; fp16 / bf16 need a CUDA GPU")
    p.add_argument("--seed", type=int, default=b("seed"), help="seed of the bases, data order and noise")
    p.add_argument("--objective", choices=RANKFT_OBJECTIVES, default=b("objective"),
                   help="denoise: denoising loss of the reference bands through the projected weights; "
                        "preserve: change of the prediction against W0 on them (keeps W_init close to the base)")
    p.add_argument("--checkpoint-every", type=int, default=b("checkpoint_every"),
                   help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.set_defaults(func=run_backbone)

    d = lambda name: dataclass_default(LoraTrainConfig, name)  # noqa: E731
    p = sub.add_parser("train-lora", formatter_class=HelpFormatter,
                       help="train a routed content/style LoRA on W_init (Eq. 6-7)")
    p.add_argument("--base", required=True, help="diffusers folder of the base model (SD 1.5 or SDXL)")
    p.add_argument("--backbone", help="W_init folder (craft train-backbone --out; default: the base UNet)")
    p.add_argument("--images", required=True, help="folder of PNG / JPEG instance images")
    p.add_argument("--kind", choices=("content", "style"), required=True, help="layer set the LoRA trains (Eq. 7)")
    p.add_argument("--prompt", required=True, help="instance prompt with its routing token, e.g. 'a sks dog <c>'")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--rank", type=int, default=d("rank"), help="LoRA rank (alpha = rank)")
    p.add_argument("--steps", type=int, default=d("steps"), help="optimiser steps")
    p.add_argument("--lr", type=float, default=d("lr"), help="AdamW learning rate")
    p.add_argument("--resolution", type=int, default=d("resolution"), help="training image size, a multiple of 8")
    p.add_argument("--routing", choices=LazyChoices(_presets), default=d("routing"), metavar="PRESET",
                   help="routing preset (default: the architecture's)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=d("mixed_precision"),
                   help="UNet compute dtype; fp16 / bf16 need a CUDA GPU")
    p.add_argument("--seed", type=int, default=d("seed"), help="seed of the LoRA factors, data order and noise")
    p.set_defaults(func=run_lora)
