"""Capacity plan for the README's "Scaling" table: measured FLOPs and weights, estimated throughput.

Measured here (no GPU needed): the FLOPs of one UNet call and one VAE decode of the public
full-size SD 1.5 / SDXL architectures at their default sizes, counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (shapes only, no weights), and
the bytes of their fp16 weights. Estimated from those: images/s per GPU at an assumed fraction
of the GPU's dense fp16 peak, GPU memory of a baked content x style set, replicas for a target
rate. Every estimated column says so; the GPU benchmark (``benchmarks/gpu_bench.py``) replaces
the assumed utilisation with a measured one once it has run.

    .venv/bin/python benchmarks/capacity_plan.py [--utilisation 0.35] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_state, machine_slug, write_report  # noqa: E402

# name -> (dense fp16 tensor-core peak in TFLOP/s without sparsity, memory GB); vendor datasheets
GPUS = {"H100 SXM 80GB": (989.4, 80), "H200 141GB": (989.4, 141), "A100 SXM 80GB": (312.0, 80),
        "L40S 48GB": (362.1, 48)}
DEFAULTS = {"sd15": dict(px=512, steps=50), "sdxl": dict(px=1024, steps=30)}  # the recipes' full-size defaults


def count(arch: str, px: int) -> dict:
    """FLOPs of one UNet call (batch 1) and one VAE decode, and fp16 bytes of UNet, VAE, text encoders."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from craft_reference.tiny import FULL_CONFIGS, _text_encoder

    spec = FULL_CONFIGS[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"], scaling_factor=spec["scaling_factor"])
        encoders = [_text_encoder(t, spec["vocab_size"], 0, 1, 2) for t in spec["text_encoders"]]
        latent = torch.randn(1, 4, px // 8, px // 8)
        context = torch.randn(1, 77, spec["unet"]["cross_attention_dim"])
        extra = {}
        if arch == "sdxl":
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}}
        with FlopCounterMode(display=False) as unet_flops:
            unet(latent, torch.tensor([500.0]), context, **extra)
        with FlopCounterMode(display=False) as vae_flops:
            vae.decode(latent)

    def fp16_bytes(module) -> int:
        return 2 * sum(p.numel() for p in module.parameters())

    return {"unet_tflop": unet_flops.get_total_flops() / 1e12, "vae_tflop": vae_flops.get_total_flops() / 1e12,
            "unet_gb": fp16_bytes(unet) / 1e9, "vae_gb": fp16_bytes(vae) / 1e9,
            "text_encoders_gb": sum(fp16_bytes(e) for e in encoders) / 1e9}


def max_square_set(unet_gb: float, fixed_gb: float, budget_gb: float) -> int:
    """Largest n with n contents x n styles baked (W_init + n + n + n^2 UNet engines) in ``budget_gb``."""
    n = 0
    while fixed_gb + (1 + 2 * (n + 1) + (n + 1) ** 2) * unet_gb <= budget_gb:
        n += 1
    return n


def plan(counts: dict, utilisation: float, activation_gb: float) -> list[dict]:
    rows = []
    for arch, c in counts.items():
        d = DEFAULTS[arch]
        # ACFG: two UNet branches per step (batch 2), then one VAE decode per image
        tflop_per_image = 2 * d["steps"] * c["unet_tflop"] + c["vae_tflop"]
        for gpu, (peak, memory) in GPUS.items():
            images_s = peak * utilisation / tflop_per_image
            fixed = c["vae_gb"] + c["text_encoders_gb"] + activation_gb
            rows.append({
                "arch": arch, "px": d["px"], "steps": d["steps"], "gpu": gpu,
                "tflop_per_image": round(tflop_per_image, 1),
                "images_per_s_estimate": round(images_s, 2),
                "unet_engine_gb": round(c["unet_gb"], 2),
                "pairs_per_gpu_estimate": max_square_set(c["unet_gb"], fixed, memory * 0.9) ** 2,
                "replicas_for_10_per_s_estimate": math.ceil(10 / images_s),
                "replicas_for_100_per_s_estimate": math.ceil(100 / images_s),
            })
    return rows


def markdown(counts: dict, rows: list[dict], utilisation: float, activation_gb: float) -> str:
    lines = ["| arch | UNet call (measured) | VAE decode (measured) | UNet fp16 weights (measured) |",
             "|---|---:|---:|---:|"]
    for arch, c in counts.items():
        lines.append(f"| {arch} {DEFAULTS[arch]['px']} px | {c['unet_tflop']:.2f} TFLOP | {c['vae_tflop']:.2f} TFLOP "
                     f"| {c['unet_gb']:.2f} GB |")
    lines += ["", f"Estimates at {utilisation:.0%} of the dense fp16 peak, {activation_gb} GB of activations per "
              "GPU, 90% of the memory for engines:", "",
              "| arch, steps | GPU | TFLOP / image | images/s (est.) | n x n baked pairs per GPU (est.) "
              "| replicas for 10 / 100 images/s (est.) |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} {r['px']} px, {r['steps']} | {r['gpu']} | {r['tflop_per_image']} "
                     f"| {r['images_per_s_estimate']} | {r['pairs_per_gpu_estimate']} "
                     f"| {r['replicas_for_10_per_s_estimate']} / {r['replicas_for_100_per_s_estimate']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utilisation", type=float, default=0.35,
                   help="assumed fraction of the dense fp16 peak reached (an estimate until gpu_bench runs)")
    p.add_argument("--activation-gb", type=float, default=4.0, help="GPU memory kept for activations (estimate)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if not 0 < args.utilisation <= 1:
        p.error(f"--utilisation: must be in (0, 1], got {args.utilisation}")
    t0 = time.perf_counter()
    counts = {arch: count(arch, DEFAULTS[arch]["px"]) for arch in DEFAULTS}
    rows = plan(counts, args.utilisation, args.activation_gb)
    report = {"date": date.today().isoformat(), "utilisation_assumed": args.utilisation,
              "activation_gb_assumed": args.activation_gb, "gpus": GPUS, "measured": counts, "plan": rows,
              "seconds": round(time.perf_counter() - t0, 1), "git": git_state()}
    out = args.out / f"capacity-plan-{machine_slug()}-{report['date']}.json"
    write_report(report, out, markdown(counts, rows, args.utilisation, args.activation_gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
