"""Training throughput and peak memory of ``craft train-backbone`` and ``craft train-lora``.

Cases:
* tiny SD 1.5 / SDXL demo models, end to end through ``train_backbone`` / ``train_lora``
  (64 px, a few generated images), each in a fresh process so its peak RSS is its own;
* with a CUDA GPU: a full-size SDXL UNet (public config, random weights; timing does not
  depend on values) at 512 and 1024 px, driving the trainers directly with random latents
  and conditioning (VAE / text encoding is a one-time preprocess and is not timed).

steps/s counts optimiser steps of the timed loop (after warm-up on GPU). Peak memory: CPU
``ru_maxrss`` of the case's process (interpreter + torch included); GPU
``torch.cuda.max_memory_allocated``. Writes ``benchmarks/results/train-<machine>-<YYYY-MM-DD>.json``
(machine: ``gpu-<name>`` with a CUDA GPU, else the CPU slug of ``_common.machine_slug``).

    .venv/bin/python benchmarks/train_bench.py [--steps 10] [--gpu-steps 10] [--threads N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import logging
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

import torch

from craft_export.architectures import SCHEDULER_CONFIG, UNET_CONFIGS

from _common import RESULTS, _slug, cpu_model, git_state, load_average, machine_slug  # benchmarks/ is on sys.path

log = logging.getLogger("train_bench")


def machine_name() -> str:
    """``gpu-<GPU name>`` with a CUDA GPU, else the CPU slug of the other benchmarks."""
    if torch.cuda.is_available():
        return f"gpu-{_slug(torch.cuda.get_device_name(0))}"
    return machine_slug()


def _write_images(folder: Path, n: int, striped: bool) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for k in range(n):
        y, x = np.mgrid[0:80, 0:80] / 20.0
        img = ((np.sin(x * 9 + k) > 0)[..., None] * rng.uniform(0, 1, (80, 80, 3)) if striped
               else np.stack([np.sin(x + k), np.cos(y), np.sin(x * y)], -1) * 0.4 + 0.5)
        Image.fromarray((img * 255).astype("uint8")).save(folder / f"{k}.png")
    return folder


# -- tiny models, end to end, one process per case ---------------------------------------------------


def _tiny_case(command: str, arch: str, root: str, steps: int, threads: int | None) -> dict:
    """Runs in a fresh process: one end-to-end training run on a tiny demo model."""
    if threads:
        torch.set_num_threads(threads)
    from craft_training.backbone import BackboneConfig, train_backbone
    from craft_training.lora import LoraTrainConfig, train_lora

    root_p = Path(root)
    base = root_p / "demo" / f"{arch}-tiny"
    out = Path(tempfile.mkdtemp(dir=root))
    if command == "train-backbone":
        config = BackboneConfig(base=base, content_images=root_p / "content", style_images=root_p / "style",
                                out=out, r_max=8, r_min=2, steps=steps, resolution=64, checkpoint_every=0)
        result = train_backbone(config)
        seconds, run = result.train_seconds, result.steps_run
    else:
        config = LoraTrainConfig(base=base, images=root_p / "content", kind="content", prompt="a sks dog <c>",
                                 out=out / "lora.safetensors", rank=8, steps=steps, resolution=64)
        result = train_lora(config)
        seconds, run = result.train_seconds, len(result.losses)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"command": command, "model": f"{arch}-tiny", "resolution": 64, "batch": 1, "steps": run,
            "steps_per_s": run / seconds, "peak_mem_mib": peak_kib / 1024, "mem_kind": "ru_maxrss (process)",
            "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}


def tiny_cases(steps: int, threads: int | None) -> list[dict]:
    from craft_reference.demo import write_demo_assets

    results = []
    with tempfile.TemporaryDirectory() as root:
        write_demo_assets(Path(root) / "demo")
        _write_images(Path(root) / "content", 3, striped=False)
        _write_images(Path(root) / "style", 3, striped=True)
        spawn = multiprocessing.get_context("spawn")
        for command in ("train-backbone", "train-lora"):
            for arch in ("sd15", "sdxl"):
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    case = pool.submit(_tiny_case, command, arch, root, steps, threads).result()
                log.info("%s", case)
                results.append(case)
    return results


# -- full-size SDXL on a GPU ----------------------------------------------------------------------------


def _sdxl_trainer(command: str, resolution: int, dtype: torch.dtype):
    """A trainer over a random-weight full-size SDXL UNet (public config) with random latents and conditioning."""
    from diffusers import UNet2DConditionModel

    from craft_export.networks import UNetNet
    from craft_training.common import NoiseSchedule
    from craft_training.backbone import BackboneConfig, RankFTData, RankFTTrainer
    from craft_training.rankft_bases import RankFTBases, layer_specs
    from craft_training.lora import LoraSet, LoraTrainConfig, LoraTrainer, lora_targets
    from craft_ops.routing import PRESETS

    device, unet_config = torch.device("cuda"), UNET_CONFIGS["sdxl"]
    with device:
        unet = UNet2DConditionModel(**unet_config)
    unet = unet.to(dtype).requires_grad_(False).eval()
    net = UNetNet(unet)
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(4, 4, resolution // 8, resolution // 8, generator=g).to(device)
    context = unet_config["cross_attention_dim"]
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    cond = {"encoder_hidden_states": torch.randn(1, 77, context, generator=g).to(device),  # (1, 77, 2048)
            "text_embeds": torch.randn(1, pooled, generator=g).to(device),  # (1, 1280)
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32,
                                     device=device)}
    schedule = NoiseSchedule.from_config(SCHEDULER_CONFIG)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "no"}[dtype]
    dummy = Path(tempfile.gettempdir())
    if command == "train-backbone":
        config = BackboneConfig(base=dummy, content_images=dummy, style_images=dummy, out=dummy, r_max=128,
                                r_min=4, resolution=resolution, mixed_precision=precision)
        bases = RankFTBases(layer_specs(unet, config.r_max, config.r_min, config.targets), g).to(device)
        return RankFTTrainer(net, bases, RankFTData(latents, latents, cond), schedule, config, dtype, g)
    config = LoraTrainConfig(base=dummy, images=dummy, kind="content", prompt="a sks dog <c>",
                             out=dummy / "x.safetensors", rank=64, resolution=resolution, mixed_precision=precision)
    names = lora_targets(unet, PRESETS["sdxl"], config.kind)
    lora = LoraSet(unet, names, config.rank, config.lora_alpha, g).attach()
    return LoraTrainer(net, lora, latents, cond, schedule, config, dtype, g)


def gpu_case(command: str, resolution: int, steps: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    import time

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    case = {"command": command, "model": "sdxl-full (random weights)", "resolution": resolution, "batch": 1,
            "dtype": str(dtype).replace("torch.", ""), "device": torch.cuda.get_device_name(0),
            "mem_kind": "torch.cuda.max_memory_allocated"}
    try:
        trainer = _sdxl_trainer(command, resolution, dtype)
        for k in range(2):  # warm-up
            trainer.step(k)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(2, 2 + steps):
            trainer.step(k)
        torch.cuda.synchronize()
        case.update(steps=steps, steps_per_s=steps / (time.perf_counter() - t0))
    except torch.OutOfMemoryError as exc:
        case.update(error=f"out of memory: {str(exc).splitlines()[0]}")
    case["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    trainer = None
    torch.cuda.empty_cache()
    log.info("%s", case)
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per tiny case")
    parser.add_argument("--gpu-steps", type=int, default=10, help="timed steps per GPU case (after 2 warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: results/train-<machine>-<date>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers

    report = {"benchmark": "train", "machine": machine_name(), "date": datetime.date.today().isoformat(),
              "cpu_model": cpu_model(), "platform": platform.platform(), "python": sys.version.split()[0],
              "torch": torch.__version__, "diffusers": diffusers.__version__, "cpu_count": os.cpu_count(),
              "git": git_state(), "load_average_start": load_average()}
    report["tiny"] = tiny_cases(args.steps, args.threads)
    if torch.cuda.is_available():
        report["sdxl_full"] = [gpu_case(c, r, args.gpu_steps) for c in ("train-backbone", "train-lora") for r in (512, 1024)]
    else:
        report["sdxl_full"] = "skipped: no CUDA GPU (full-size SDXL cases need one)"
        print("full-size SDXL cases skipped: no CUDA GPU", file=sys.stderr)
    report["load_average_end"] = load_average()
    out = args.out or RESULTS / f"train-{report['machine']}-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    for case in report["tiny"] + (report["sdxl_full"] if isinstance(report["sdxl_full"], list) else []):
        print(f"{case['command']:15s} {case['model']:28s} {case['resolution']:5d}px "
              f"{case.get('steps_per_s', float('nan')):8.2f} steps/s  peak {case['peak_mem_mib']:9.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
