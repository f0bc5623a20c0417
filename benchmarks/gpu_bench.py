"""GPU benchmark: TensorRT vs PyTorch for the CRAFT-LoRA serving path, one command, one GPU.

Everything is measured in one process on one GPU (full-size SD 1.5 / SDXL models from the public
configs in shared/REFERENCE-ARCHITECTURES.md, random weights: timing does not depend on values):

* ``unet``: UNet step latency at batch 1 and 2 (SD 1.5 at 512 px, SDXL at 1024 px) for
  (a) PyTorch fp16 eager (diffusers ``UNet2DConditionModel``, SDPA attention) and
  (b) a TensorRT fp16 engine built from this project's ONNX export
  (``craft_export.onnx_export.export_onnx`` + ``craft_export.specs.network_specs``, then
  ``craft_export.tensorrt_build.EngineBuild``, refittable like the served UNets, the recipe's
  default image range, batch 1..2), run through ``craft_export.trt_session.TrtSession`` eagerly and
  replayed as a CUDA graph. Achieved TFLOP/s = FLOP per sample x batch / latency, against a dense
  fp16 datasheet peak per device and a measured fp16 matrix-product ceiling; the FLOPs are counted
  (``torch.utils.flop_counter.FlopCounterMode``, one forward of the timed model at the bench size:
  about 6.8 TFLOP for SDXL at 1024 px, 0.8 for SD 1.5 at 512 px). TensorRT output vs PyTorch fp16 output: relative L2 error.
  GPU memory per engine: TensorRT weights / activation scratch (``device_memory_size_v2``) / the
  driver's free-memory drop at load; PyTorch: parameter bytes and the allocator peak per forward.
* ``e2e``: whole images, ``craft_ops.sampling.sample`` (the served loop): SDXL 30 steps at 1024 px
  and SD 1.5 50 steps at 512 px, euler, with time-gated ACFG (two weight sets, W_init for the
  unconditional branch) and plain CFG (one batch-2 call per step). Denoiser: TensorRT
  (``TrtDenoiser``; ACFG's two branches concurrently on two streams, and serially) and PyTorch fp16
  eager for comparison. Text encoders and the VAE decoder are PyTorch fp16 in every variant (not
  TensorRT): the numbers isolate the UNet runtime. TensorRT ACFG uses two engine instances (the same
  plan deserialised twice: W_init and one variant); a real repository holds one engine per
  exported weight variant, which costs memory, not time.
* ``diffusers``: the same images with diffusers' own pipelines in PyTorch fp16 and plain CFG, with
  two LoRAs (rank ``--lora-rank``, attention / projection / feed-forward / 3x3 resnet convs, made
  by ``craft_reference.demo.make_lora_state_dict(fmt="peft")``) loaded unfused through PEFT
  (``load_lora_weights`` + ``set_adapters``) - the reference implementation's way - and then fused
  (``fuse_lora`` + ``unload_lora_weights``). Speed-up ratios against the TensorRT ACFG image.
* ``triton`` (``--triton``, optional): images/s and p50/p99 latency at concurrency 1/4/8 through a
  real tritonserver (``craft_serving.triton_server.TritonServer``) on a repository exported with
  ``--runtime tensorrt`` (``--triton-repo``; default: the tiny demo SD 1.5 repository, exported
  into the cache - that measures the serving path's overhead, not full-size throughput).

Results: ``benchmarks/results/<device>-<date>.json`` and ``.md`` (``--out`` to put them elsewhere).
Runs on the same GPU the same day merge into one file (so the work can be split over several
commands, e.g. ``--arch sd15`` then ``--arch sdxl``). ONNX files and engines are cached in
``--cache`` (default ``$CRAFT_CACHE_DIR/gpu-bench``) and reused when the weights, TensorRT
version, GPU and profile match. Without a CUDA GPU the script prints and saves
``{"skipped": "no CUDA GPU"}`` and exits 0. Sections whose packages are missing (tensorrt, peft,
tritonserver) are recorded as skipped with the reason.

Timing: CUDA events around each call on the caller's stream (TrtSession's stream is joined to
it), after warm-up, median of ``--reps`` (and min/max); whole images: wall clock between device
synchronisations, median of the timed runs. First run on a fresh machine: ONNX export and engine
builds take most of the time (SDXL: several minutes); ``--quick`` cuts repetitions, not sizes.

    python benchmarks/gpu_bench.py [--quick] [--arch sd15,sdxl] [--sections unet,e2e,diffusers]
                                   [--triton [--triton-repo REPO]] [--out DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# Public full-size architectures (configs only; the models get random weights).
from craft_export.architectures import SCHEDULER_CONFIG, VAE_SCALING as SCALING

from _common import RESULTS  # benchmarks/ is on sys.path when this runs as a script

log = logging.getLogger("gpu_bench")

SCHEMA = 1
ARCHES = ("sd15", "sdxl")
SECTIONS = ("unet", "e2e", "diffusers")

SIZE = {"sd15": 512, "sdxl": 1024}
STEPS = {"sd15": 50, "sdxl": 30}
GUIDANCE = {"sd15": 7.5, "sdxl": 5.0}  # diffusers guidance_scale; ACFG/CFG omega = guidance - 1

# Dense fp16 tensor-core peak (no sparsity), TFLOP/s, from the datasheets; matched on the device name.
PEAK_FP16_DENSE = (
    (r"H200", "H200", 989.4),
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100.*NVL", "H100 NVL", 835.0),
    (r"H100", "H100 SXM", 989.4),
    (r"GH200", "GH200", 989.4),
    (r"A100", "A100", 312.0),
    (r"L40S", "L40S", 362.1),
)

PROMPT = "a dog <c> in watercolor style <s>"
PROMPT_PLAIN = "a dog in watercolor style"
NEGATIVE = "low quality, blurry"


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "unknown"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def peak_for(name: str) -> tuple[str | None, float | None]:
    for pattern, label, tflops in PEAK_FP16_DENSE:
        if re.search(pattern, name):
            return label, tflops
    return None, None


class Progress:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)


say = Progress()


def stats(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"median_ms": round(statistics.median(ms), 4), "min_ms": round(ms[0], 4), "max_ms": round(ms[-1], 4),
            "reps": len(ms)}


def time_device(fn: Callable[[], Any], *, warmup: int, reps: int, device) -> dict:
    """Latency of ``fn``: CUDA events on the current stream (perf_counter + sync on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return stats(times)


def time_wall(fn: Callable[[], Any], *, warmup: int, reps: int, device) -> dict:
    """Wall-clock latency of a whole image, synchronising the device around each run."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return stats(times)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn``, counted by ``torch.utils.flop_counter.FlopCounterMode``: 2 per
    multiply-add of matrix products, convolutions and attention (element-wise work is not counted).
    The CPU attention kernel, which the counter does not know, is counted like the CUDA ones."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    custom = {cpu_op: cpu_attention} if cpu_op is not None else {}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return int(counter.get_total_flops())


def rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den else float("inf")


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def section_guard(record: dict, name: str, fn: Callable[[], dict]) -> None:
    """Run one section; a failure is recorded (with its traceback tail) instead of ending the run."""
    try:
        record[name] = fn()
    except SkipSection as exc:
        say(f"{name}: skipped: {exc}")
        record[name] = {"skipped": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the other sections still run
        say(f"{name}: FAILED: {type(exc).__name__}: {exc}")
        record[name] = {"error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc().splitlines()[-12:]}


class SkipSection(RuntimeError):
    """A section cannot run here (a missing package, no tritonserver...)."""


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------

def device_info(device) -> dict:
    import torch

    props = torch.cuda.get_device_properties(device)
    info = {"name": props.name, "total_memory_gib": round(props.total_memory / 2**30, 2),
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}", "uuid": str(getattr(props, "uuid", "") or "")}
    try:  # read-only query; nothing about the card is changed
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader", f"--id={device.index or 0}"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            driver, sm_clock, power = [x.strip() for x in out.stdout.strip().split(",")[:3]]
            info.update(driver=driver, max_sm_clock=sm_clock, power_limit=power)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    label, peak = peak_for(props.name)
    info.update(peak_label=label, peak_fp16_dense_tflops=peak)
    return info


def software_info() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("tensorrt", "diffusers", "transformers", "peft", "onnx", "onnxruntime"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - missing or broken: recorded as absent
            out[name] = None
    return out


def measure_ceilings(device, quick: bool) -> dict:
    """A large fp16 matrix product and a device-to-device copy (METHOD.md: measure the two ceilings)."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    mm = time_device(lambda: torch.matmul(a, b), warmup=3, reps=5 if quick else 20, device=device)
    tflops = 2 * n**3 / (mm["median_ms"] * 1e-3) / 1e12
    a = b = None
    src = torch.randn(2**28, device=device, dtype=torch.float16)  # 512 MiB
    dst = torch.empty_like(src)
    cp = time_device(lambda: dst.copy_(src), warmup=3, reps=5 if quick else 20, device=device)
    tb_s = 2 * src.numel() * 2 / (cp["median_ms"] * 1e-3) / 1e12
    src = dst = None
    free_memory(device)
    return {"fp16_matmul_8192_tflops": round(tflops, 1), "d2d_copy_tb_s": round(tb_s, 2)}


# ---------------------------------------------------------------------------------------------
# full-size models (random weights) and their specs
# ---------------------------------------------------------------------------------------------

class Parts:
    """Full-size networks of one architecture, fp16 on the device, plus tokenizers and specs."""

    def __init__(self, arch: str, cache: Path, device, dtype, *, tiny: bool = False):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTokenizer

        from craft_export.networks import TextEncoderNet, UNetNet, VaeDecoderNet
        from craft_export.network_specs import network_specs
        from craft_reference.tiny import FULL_CONFIGS, TINY_CONFIGS, _text_encoder, write_clip_tokenizer

        self.arch, self.device, self.dtype = arch, device, dtype
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(0)
        sized = (TINY_CONFIGS if tiny else FULL_CONFIGS)[arch]  # what `craft demo-assets --size` builds
        vae_cfg = dict(sized["vae"], sample_size=SIZE[arch])
        with torch.device(device):
            self.unet = UNet2DConditionModel(**sized["unet"]).to(dtype).eval().requires_grad_(False)
            self.vae = AutoencoderKL(**vae_cfg, scaling_factor=SCALING[arch],
                                     force_upcast=False).to(dtype).eval().requires_grad_(False)
        self.tokenizers, self.text_encoders = [], []
        for i, spec in enumerate(sized["text_encoders"]):
            pad = "<|endoftext|>" if i == 0 else "!"
            folder = cache / "tokenizers" / f"tokenizer{'' if i == 0 else '_2'}"
            write_clip_tokenizer(folder, pad_token=pad)
            tok = CLIPTokenizer.from_pretrained(folder)
            vocab = tok.get_vocab()
            with torch.device(device):
                enc = _text_encoder(spec, sized.get("vocab_size") or len(vocab), vocab[pad], vocab["<|endoftext|>"],
                                    vocab["<|startoftext|>"]).to(dtype).eval().requires_grad_(False)
            self.tokenizers.append(tok)
            self.text_encoders.append(enc)
        configs = {"unet": self.unet.config, "vae": self.vae.config, "text_encoder": self.text_encoders[0].config}
        if arch == "sdxl":
            configs["text_encoder_2"] = self.text_encoders[1].config
        self.specs = network_specs(arch, configs, max_batch=8)
        self.unet_net = UNetNet(self.unet)
        self.encoder_nets = [TextEncoderNet(e, penultimate=arch == "sdxl", pooled=i == 1)
                             for i, e in enumerate(self.text_encoders)]
        self.vae_net = VaeDecoderNet(self.vae, arch)
        self.latent_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)

    def fingerprint(self) -> str:
        """Identifies the UNet weights (so a cached engine is only reused for the same random init)."""
        h = hashlib.sha256()
        params = list(self.unet.parameters())
        h.update(str(sum(p.numel() for p in params)).encode())
        for p in (params[0], params[len(params) // 2], params[-1]):
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- the served path's pieces, in PyTorch fp16 -------------------------------------------------

    def encode(self, texts: list[str], height: int, width: int) -> dict:
        import torch

        from craft_ops.conditioning import build_conditioning, tokenize

        ids = tokenize(self.tokenizers, texts)
        hiddens, pooled = [], None
        with torch.inference_mode():
            for net, token_ids in zip(self.encoder_nets, ids):
                out = net(torch.from_numpy(token_ids).to(self.device))
                hiddens.append(out[0])
                if len(out) > 1:
                    pooled = out[1]
        return build_conditioning(self.arch, hiddens, pooled, height, width)

    def decode(self, latents) -> np.ndarray:
        import torch

        from craft_ops.conditioning import to_uint8

        with torch.inference_mode():
            return to_uint8(self.vae_net(latents.to(self.dtype)))

    def unet_inputs(self, batch: int, hw: tuple[int, int], seed: int, dtype) -> dict:
        from craft_export.onnx_export import example_inputs

        inputs = example_inputs(self.specs["unet"], hw=hw, batch=batch, seed=seed)
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


class _IOCast:
    """Wraps UNetNet for export: FP32 graph inputs/outputs (the spec) around a model of any dtype."""

    def __new__(cls, net, dtype):
        import torch

        class IOCast(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
                cast = (lambda t: None if t is None else t.to(dtype))
                return self.net(cast(sample), timestep, cast(encoder_hidden_states), cast(text_embeds),
                                time_ids).float()

        return IOCast()


def engine_image_range(arch: str):
    from craft_export.recipe import ARCH_DEFAULTS
    from craft_export.specs import ImageRange

    d = ARCH_DEFAULTS[arch]
    return ImageRange((d["min_size"],) * 2, (d["size"],) * 2, (d["max_size"],) * 2)


def build_unet_engine(parts: Parts, cache: Path, onnx_weights: str) -> tuple[Path, dict]:
    """``cache/<arch>/unet/model.plan`` from this project's ONNX export; reused when nothing changed."""
    import tensorrt as trt
    import torch

    from craft_export.onnx_export import example_inputs, export_onnx
    from craft_export.tensorrt_build import EngineBuild
    from craft_export.trt_policy import profile_batch

    arch, spec = parts.arch, parts.specs["unet"]
    folder = cache / arch / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path, plan_path, meta_path = folder / "model.onnx", folder / "model.plan", folder / "build.json"
    image_range = engine_image_range(arch)
    profile = spec.profile(image_range, profile_batch("unet", 2))  # batch 1..2, tuned for 2 as craft export does
    onnx_key = {"fingerprint": parts.fingerprint(), "torch": torch.__version__, "weights": onnx_weights}
    key = {**onnx_key, "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(parts.device),
           "profile": {n: [p.min, p.opt, p.max] for n, p in profile.items()}, "refittable": True}
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    info = {"onnx_weights": onnx_weights, "profile": key["profile"], "refittable": True, "cached": False}
    if plan_path.is_file() and meta.get("engine_key") == key:
        info.update(cached=True, build_seconds=meta.get("build_seconds"), export_seconds=meta.get("export_seconds"))
        return plan_path, info
    if not onnx_path.is_file() or meta.get("onnx_key") != onnx_key:
        say(f"{arch}: exporting the UNet to ONNX ({onnx_weights} weights) -> {onnx_path}")
        t0 = time.perf_counter()
        dtype = torch.float32 if onnx_weights == "fp32" else torch.float16
        parts.unet.to(dtype)
        try:
            lo = image_range.min_hw
            inputs = {k: v.to(parts.device) for k, v in example_inputs(spec, hw=lo, batch=2, seed=0).items()}
            export_onnx(_IOCast(parts.unet_net, dtype), spec, inputs, onnx_path)
        finally:
            parts.unet.to(parts.dtype)
            free_memory(parts.device)
        meta = {"onnx_key": onnx_key, "export_seconds": round(time.perf_counter() - t0, 1)}
        meta_path.write_text(json.dumps(meta, indent=2))
    say(f"{arch}: building the TensorRT fp16 engine (refittable, profile {key['profile']['sample']})")
    t0 = time.perf_counter()
    engine = EngineBuild("fp16").build(onnx_path, profile, refittable=True)
    plan_path.write_bytes(engine)
    meta.update(engine_key=key, build_seconds=round(time.perf_counter() - t0, 1))
    meta_path.write_text(json.dumps(meta, indent=2))
    info.update(build_seconds=meta["build_seconds"], export_seconds=meta.get("export_seconds"))
    return plan_path, info


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------

def trt_session(parts: Parts, state: dict, args):
    """The arch's TensorRT UNet session (engine built or taken from the cache), or None when unavailable."""
    arch = parts.arch
    sessions = state.setdefault("trt_sessions", {})
    if arch in sessions:
        return sessions[arch]
    if "trt" not in state["runtimes"]:
        return None
    from craft_export.trt_session import TrtSession

    plan, info = build_unet_engine(parts, args.cache, args.onnx_weights)
    say(f"{arch}: loading {plan}")
    session = TrtSession(plan, device=parts.device)
    described = session.describe()
    info.update({k: described[k] for k in ("scratch_bytes", "weights_bytes", "loaded_bytes")},
                plan_bytes=plan.stat().st_size, plan=str(plan))
    sessions[arch] = session
    state.setdefault("engine_info", {})[arch] = info
    return session


def bench_unet(parts: Parts, state: dict, args) -> dict:
    """UNet step latency, batch 1 and 2: PyTorch fp16 eager, TensorRT eager and CUDA graph."""
    import torch

    arch, device = parts.arch, parts.device
    hw = (SIZE[arch], SIZE[arch])
    counted = parts.unet_inputs(1, hw, seed=0, dtype=parts.dtype)
    flop = count_flops(lambda: parts.unet_net(**counted))  # per sample: the timed model, at the timed size
    peak = state["device"].get("peak_fp16_dense_tflops")
    measured = state.get("ceilings", {}).get("fp16_matmul_8192_tflops")
    warmup, reps = (2, 5) if args.quick else (5, 20)

    def rate(ms: float, batch: int) -> dict:
        if not flop:
            return {}
        tflops = flop * batch / (ms * 1e-3) / 1e12
        out = {"tflops": float(f"{tflops:.4g}")}
        if peak:
            out["pct_of_peak"] = round(100 * tflops / peak, 1)
        if measured:
            out["pct_of_measured_matmul"] = round(100 * tflops / measured, 1)
        return out

    result: dict[str, Any] = {"size": hw[0], "flop_per_sample": flop, "flop_counter": "torch FlopCounterMode",
                              "batches": {}}
    params = sum(p.numel() * p.element_size() for p in parts.unet.parameters())
    result["torch_memory"] = {"param_bytes": params}
    session = trt_session(parts, state, args)
    if session is not None:
        result["engine"] = dict(state["engine_info"][arch])
    else:
        result["engine"] = {"skipped": state["runtimes_missing"].get("trt", "unavailable")}

    for batch in (1, 2):
        row: dict[str, Any] = {}
        half = parts.unet_inputs(batch, hw, seed=batch, dtype=parts.dtype)
        fp32 = {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t = time_device(lambda: parts.unet_net(**half), warmup=warmup, reps=reps, device=device)
            ref = parts.unet_net(**half).float()
            if device.type == "cuda":
                result["torch_memory"][f"peak_activation_bytes_b{batch}"] = torch.cuda.max_memory_allocated(device) - base
        row["torch_fp16_eager"] = {**t, **rate(t["median_ms"], batch), "finite": bool(torch.isfinite(ref).all())}
        say(f"{arch} UNet b{batch}: PyTorch fp16 eager {t['median_ms']:.2f} ms")
        if session is not None:
            session.cuda_graphs = False
            t = time_device(lambda: session.run_torch(fp32, copy=False), warmup=warmup, reps=reps, device=device)
            got = session.run_torch(fp32)["noise_pred"]
            row["trt_fp16_eager"] = {**t, **rate(t["median_ms"], batch), "rel_l2_vs_torch_fp16": rel_l2(got, ref)}
            say(f"{arch} UNet b{batch}: TensorRT eager {t['median_ms']:.2f} ms (rel L2 vs PyTorch {rel_l2(got, ref):.2e})")
            # graphs captured so far: batch 1's stays captured while batch 2 runs, so count the new one
            graphs_before = sum(b.graph is not None for b in session._bindings.values())
            session.cuda_graphs = True
            t = time_device(lambda: session.run_torch(fp32, copy=False), warmup=warmup + 2, reps=reps, device=device)
            got_graph = session.run_torch(fp32)["noise_pred"]
            captured = sum(b.graph is not None for b in session._bindings.values()) > graphs_before
            row["trt_fp16_cuda_graph"] = {**t, **rate(t["median_ms"], batch), "captured": captured,
                                          "max_abs_diff_vs_eager": float((got_graph - got).abs().max())}
            say(f"{arch} UNet b{batch}: TensorRT CUDA graph {t['median_ms']:.2f} ms (captured: {captured})")
            session.cuda_graphs = False
            row["speedup_trt_vs_torch"] = round(row["torch_fp16_eager"]["median_ms"] / row["trt_fp16_eager"]["median_ms"], 2)
        result["batches"][str(batch)] = row
    free_memory(device)
    return result


def _sampling_config(arch: str, steps: int, mode: str):
    from craft_ops.sampling import SamplingConfig

    return SamplingConfig(steps=steps, omega=GUIDANCE[arch] - 1.0, mode=mode, content="content", style="style",
                          gamma_c=1.0, gamma_s=1.0)


class TorchDenoiser:
    """PyTorch fp16 eager UNet as the sampling loop's denoiser (one weight set serves every variant:
    the same cost as two; CFG's two calls are batched like the TensorRT denoiser does)."""

    def __init__(self, parts: Parts):
        self.parts = parts

    def __call__(self, calls):
        import torch

        from craft_ops.conditioning import unet_inputs

        per = [unet_inputs(c.x, c.t, c.cond) for c in calls]
        same = len({c.variant for c in calls}) == 1
        groups = [list(range(len(calls)))] if same else [[i] for i in range(len(calls))]
        out: list = [None] * len(calls)
        with torch.inference_mode():
            for g in groups:
                batch = {n: torch.cat([per[i][n] for i in g]) for n in per[g[0]]}
                batch = {n: v.to(self.parts.dtype) if n != "timestep" and v.is_floating_point() else v
                         for n, v in batch.items()}
                eps = self.parts.unet_net(**batch).float()
                offset = 0
                for i in g:
                    n = calls[i].x.shape[0]
                    out[i] = eps[offset: offset + n]
                    offset += n
        return out


def run_image(parts: Parts, denoise, steps: int, mode: str, *, seed: int = 0) -> np.ndarray:
    """One image through the served loop: encode (uncond + cond), sample, decode, to uint8 on the host."""
    import torch

    from craft_ops.sampling import make_scheduler, sample

    arch = parts.arch
    h = w = SIZE[arch]
    uncond = parts.encode([NEGATIVE], h, w)
    cond = parts.encode([PROMPT_PLAIN], h, w)  # routing tokens are stripped before encoding (Eq. 6)
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, 4, h // parts.latent_scale, w // parts.latent_scale), generator=g).to(parts.device)
    scheduler = make_scheduler("euler", SCHEDULER_CONFIG)
    latents = sample(denoise, scheduler, noise, cond, uncond, _sampling_config(arch, steps, mode))
    return parts.decode(latents)


def bench_e2e(parts: Parts, state: dict, args) -> dict:
    """Whole images through craft_ops.sampling.sample: TensorRT and PyTorch denoisers, ACFG and CFG."""
    from craft_ops.aggregate import BASE

    arch, device = parts.arch, parts.device
    steps = args.steps[arch]
    warmup, reps = (1, 1) if args.quick else (1, 3)
    result: dict[str, Any] = {"size": SIZE[arch], "steps": steps, "scheduler": "euler",
                              "text_encoders_and_vae": f"PyTorch {str(parts.dtype).replace('torch.', '')} eager",
                              "runs": {}}
    variants: dict[str, Callable] = {}
    session = trt_session(parts, state, args)
    if session is not None:
        from craft_export.trt_session import TrtSession
        from craft_serving.trt_denoiser import TrtDenoiser

        # W_init and one variant: the same plan loaded twice (its own weights in GPU memory each)
        base_session = session
        base_session.cuda_graphs = args.cuda_graphs
        variant_session = TrtSession(state["engine_info"][arch]["plan"], device=device, cuda_graphs=args.cuda_graphs)

        def pick(v):
            return base_session if v == BASE else variant_session

        result["trt_sessions"] = {"count": 2, "cuda_graphs": args.cuda_graphs,
                                  "loaded_bytes_each": variant_session.loaded_bytes}
        variants["trt_acfg_concurrent"] = lambda: run_image(parts, TrtDenoiser(pick, concurrent=True), steps, "acfg")
        variants["trt_acfg_serial"] = lambda: run_image(parts, TrtDenoiser(pick, concurrent=False), steps, "acfg")
        variants["trt_cfg"] = lambda: run_image(parts, TrtDenoiser(pick), steps, "cfg")
    else:
        result["trt"] = {"skipped": state["runtimes_missing"].get("trt", "tiny dry run")}
    torch_denoiser = TorchDenoiser(parts)
    variants["torch_acfg"] = lambda: run_image(parts, torch_denoiser, steps, "acfg")
    variants["torch_cfg"] = lambda: run_image(parts, torch_denoiser, steps, "cfg")
    for name, fn in variants.items():
        t = time_wall(fn, warmup=warmup, reps=reps, device=device)
        t["per_step_ms"] = round(t["median_ms"] / steps, 3)
        result["runs"][name] = t
        say(f"{arch} image ({steps} steps): {name} {t['median_ms']:.0f} ms")
    if session is not None:
        base_session.cuda_graphs = False
        variant_session.close()
        del variant_session
    runs = result["runs"]
    ratios = {}
    for runtime in ("trt", "torch"):
        acfg = runs.get(f"{runtime}_acfg_concurrent") or runs.get(f"{runtime}_acfg")
        cfg = runs.get(f"{runtime}_cfg")
        if acfg and cfg:
            ratios[f"{runtime}_acfg_over_cfg"] = round(acfg["median_ms"] / cfg["median_ms"], 3)
    if "trt_acfg_serial" in runs:
        ratios["trt_acfg_serial_over_concurrent"] = round(runs["trt_acfg_serial"]["median_ms"]
                                                          / runs["trt_acfg_concurrent"]["median_ms"], 3)
    result["ratios"] = ratios
    free_memory(device)
    return result


def bench_diffusers(parts: Parts, state: dict, args) -> dict:
    """diffusers' own pipeline (plain CFG) with two LoRAs through PEFT: unfused, then fused."""
    if not have("peft"):
        raise SkipSection("diffusers LoRA loading needs the peft package (pip install peft)")
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from craft_reference.demo import lora_target_modules, make_lora_state_dict
    from craft_export.loading import unet_module_shapes

    arch, device = parts.arch, parts.device
    steps = args.steps[arch]
    warmup, reps = (1, 1) if args.quick else (1, 3)
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoders[0],
                                         text_encoder_2=parts.text_encoders[1], tokenizer=parts.tokenizers[0],
                                         tokenizer_2=parts.tokenizers[1], unet=parts.unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0],
                                       unet=parts.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    shapes = unet_module_shapes(parts.unet)
    modules = lora_target_modules(shapes)
    rank = args.lora_rank
    loras = {}
    for name, seed in (("content", 11), ("style", 22)):
        sd = make_lora_state_dict(shapes, modules, rank=rank, alpha=float(rank), seed=seed, fmt="peft")
        loras[name] = {k: v.to(parts.dtype) for k, v in sd.items()}
    lora_params = sum(v.numel() for v in loras["content"].values())
    h = w = SIZE[arch]

    def image():
        return pipe(prompt=PROMPT_PLAIN, negative_prompt=NEGATIVE, num_inference_steps=steps,
                    guidance_scale=GUIDANCE[arch], height=h, width=w, output_type="np",
                    generator=torch.Generator(device).manual_seed(0)).images

    result: dict[str, Any] = {"size": h, "steps": steps, "mode": "cfg (diffusers)", "lora_rank": rank,
                              "lora_modules": len(modules), "lora_params_each": lora_params, "runs": {}}
    # the UNet is shared with the other sections: this one runs last and mutates it (LoRA fused in)
    for name, sd in loras.items():
        pipe.load_lora_weights(sd, adapter_name=name)
    pipe.set_adapters(["content", "style"], [1.0, 1.0])
    wrapped = [m for m in parts.unet.modules() if hasattr(m, "lora_A") and "content" in getattr(m, "lora_A", {})]
    result["peft_wrapped_modules"] = len(wrapped)
    result["lora_param_dtype"] = str(wrapped[0].lora_A["content"].weight.dtype) if wrapped else None
    t = time_wall(image, warmup=warmup, reps=reps, device=device)
    t["per_step_ms"] = round(t["median_ms"] / steps, 3)
    result["runs"]["diffusers_lora_unfused"] = t
    say(f"{arch} diffusers, 2 LoRAs unfused (PEFT): {t['median_ms']:.0f} ms")
    pipe.fuse_lora(adapter_names=["content", "style"], lora_scale=1.0)
    pipe.unload_lora_weights()
    t = time_wall(image, warmup=warmup, reps=reps, device=device)
    t["per_step_ms"] = round(t["median_ms"] / steps, 3)
    result["runs"]["diffusers_lora_fused"] = t
    say(f"{arch} diffusers, 2 LoRAs fused: {t['median_ms']:.0f} ms")
    result["ratios"] = {"unfused_over_fused": round(result["runs"]["diffusers_lora_unfused"]["median_ms"]
                                                    / result["runs"]["diffusers_lora_fused"]["median_ms"], 3)}
    pipe = loras = None  # noqa: F841 - drop the references before freeing memory
    free_memory(device)
    return result


def bench_triton(state: dict, args) -> dict:
    """Images/s and p50/p99 through tritonserver at concurrency 1/4/8 (loopback only, bounded)."""
    from craft_serving.triton_server import ServerConfig, TritonServer, TritonServerError, find_tritonserver

    try:
        find_tritonserver()
    except TritonServerError as exc:
        raise SkipSection(f"no tritonserver: {exc}") from None
    repo = Path(args.triton_repo) if args.triton_repo else None
    if repo is None:
        if "trt" not in state["runtimes"]:
            raise SkipSection("no --triton-repo and no tensorrt to export the demo repository with")
        from craft_reference.demo import write_demo_assets
        from craft_export.exporter import ExportOptions, export_repository

        demo = args.cache / "demo"
        if not (demo / "recipe-sd15.toml").is_file():
            write_demo_assets(demo)
        repo = args.cache / "triton-demo-sd15"
        say(f"triton: exporting the tiny demo SD 1.5 repository (--runtime tensorrt) -> {repo}")
        export_repository(ExportOptions(recipe=demo / "recipe-sd15.toml", out=repo, runtime="tensorrt",
                                        precision="fp16", runner="auto"))
    from craft_client import CraftClient
    from craft_serving.manifest import read_manifest

    view = read_manifest(repo)
    if view.runtime != "tensorrt":
        raise SkipSection(f"{repo} was exported with --runtime {view.runtime}, not tensorrt")
    contents = [n for n, i in view.catalog.items() if i.kind == "content"]
    styles = [n for n, i in view.catalog.items() if i.kind == "style"]
    fields: dict[str, Any] = {"seed": 1}
    if contents and styles and (contents[0], styles[0]) in set(view.pairs):
        fields.update(content=contents[0], style=styles[0])
    prompt = PROMPT if "content" in fields else PROMPT_PLAIN
    config = ServerConfig.with_free_ports(repo)
    result: dict[str, Any] = {"repo": str(repo), "arch": view.arch, "runner": view.runner,
                              "request": {"prompt": prompt, **fields, "steps": view.defaults.steps,
                                          "size": [view.defaults.height, view.defaults.width]},
                              "concurrency": {}}
    per_worker = 2 if args.quick else 6
    with TritonServer(config, log_path=args.cache / "tritonserver.log", ready_timeout=600):
        with CraftClient(config.grpc_url) as client:  # warm-up: first request loads lazily-built state
            client.generate(prompt, **fields)
        for concurrency in (1, 4, 8):
            latencies: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()

            def worker():
                with CraftClient(config.grpc_url) as c:
                    for _ in range(per_worker):
                        t0 = time.perf_counter()
                        try:
                            c.generate(prompt, **fields)
                        except Exception as exc:  # noqa: BLE001 - counted, reported
                            with lock:
                                errors.append(str(exc)[:200])
                            continue
                        with lock:
                            latencies.append((time.perf_counter() - t0) * 1e3)

            threads = [threading.Thread(target=worker) for _ in range(concurrency)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            row = {"requests": concurrency * per_worker, "errors": len(errors), "images_per_s": round(len(latencies) / wall, 3)}
            if latencies:
                row.update(p50_ms=round(float(np.percentile(latencies, 50)), 1),
                           p99_ms=round(float(np.percentile(latencies, 99)), 1))
            if errors:
                row["first_error"] = errors[0]
            result["concurrency"][str(concurrency)] = row
            say(f"triton concurrency {concurrency}: {row}")
    return result


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------

def results_path(out: Path, device_name: str, date: str, suffix: str) -> Path:
    return out / f"{slug(device_name)}-{date}{suffix}"


def merge(old: dict, new: dict) -> dict:
    """New sections replace old ones of the same arch; a different GPU starts afresh."""
    if old.get("device", {}).get("uuid") != new.get("device", {}).get("uuid") or "skipped" in old:
        return new
    merged = dict(old)
    for key in ("device", "software", "ceilings", "peak"):
        if key in new:
            merged[key] = new[key]
    started = {r.get("started") for r in new.get("runs", [])}
    merged["runs"] = [r for r in old.get("runs", []) if r.get("started") not in started] + new.get("runs", [])
    arches = dict(old.get("arches", {}))
    for arch, sections in new.get("arches", {}).items():
        arches[arch] = {**arches.get(arch, {}), **sections}
    merged["arches"] = arches
    if "triton" in new:
        merged["triton"] = new["triton"]
    return merged


def summary_ratios(record: dict) -> dict:
    out = {}
    for arch, sec in record.get("arches", {}).items():
        e2e = sec.get("e2e", {}).get("runs", {})
        diff = sec.get("diffusers", {}).get("runs", {})
        trt = e2e.get("trt_acfg_concurrent")
        r = {}
        for name in ("diffusers_lora_unfused", "diffusers_lora_fused"):
            if trt and name in diff:
                r[f"{name}_over_trt_acfg"] = round(diff[name]["median_ms"] / trt["median_ms"], 2)
        r.update(sec.get("e2e", {}).get("ratios", {}))
        unet = sec.get("unet", {}).get("batches", {})
        for b, row in unet.items():
            if "speedup_trt_vs_torch" in row:
                r[f"unet_b{b}_trt_over_torch_speedup"] = row["speedup_trt_vs_torch"]
        if r:
            out[arch] = r
    return out


def _fmt_ms(row: Mapping | None) -> str:
    return f"{row['median_ms']:.2f}" if row and "median_ms" in row else "-"


def markdown(record: dict) -> str:
    if "skipped" in record:
        return f"# GPU benchmark\n\nSkipped: {record['skipped']} ({record.get('date', '')}, host {record.get('host', '')}).\n"
    dev = record["device"]
    sw = record["software"]
    lines = [f"# GPU benchmark: {dev['name']} ({record['date']})", "",
             f"torch {sw.get('torch')} (CUDA {sw.get('cuda')}), TensorRT {sw.get('tensorrt')}, diffusers "
             f"{sw.get('diffusers')}, peft {sw.get('peft')}; driver {dev.get('driver', '?')}. "
             f"Dense fp16 peak ({dev.get('peak_label') or 'unknown device'}): {dev.get('peak_fp16_dense_tflops') or '?'} TFLOP/s; "
             f"measured fp16 8192^3 matmul: {record.get('ceilings', {}).get('fp16_matmul_8192_tflops', '?')} TFLOP/s; "
             f"device-to-device copy: {record.get('ceilings', {}).get('d2d_copy_tb_s', '?')} TB/s.", "",
             "Full-size UNets from the public configs, random weights. Latency: median of CUDA-event timings.", ""]
    for arch, sec in record.get("arches", {}).items():
        unet = sec.get("unet", {})
        lines += [f"## {arch} ({SIZE[arch]} px)", ""]
        if "batches" in unet:
            lines += ["| UNet step | batch | ms | TFLOP/s | % of peak | rel L2 vs PyTorch |", "|---|---|---|---|---|---|"]
            for b, row in unet["batches"].items():
                for key, label in (("torch_fp16_eager", "PyTorch fp16 eager"), ("trt_fp16_eager", "TensorRT fp16"),
                                   ("trt_fp16_cuda_graph", "TensorRT fp16 + CUDA graph")):
                    if key in row:
                        r = row[key]
                        err = r.get("rel_l2_vs_torch_fp16")
                        lines.append(f"| {label} | {b} | {_fmt_ms(r)} | {r.get('tflops', '-')} | {r.get('pct_of_peak', '-')} | "
                                     f"{'' if err is None else f'{err:.2e}'} |")
            eng = unet.get("engine", {})
            if "plan_bytes" in eng:
                lines += ["", f"TensorRT engine: plan {eng['plan_bytes'] / 2**30:.2f} GiB, weights "
                              f"{(eng.get('weights_bytes') or 0) / 2**30:.2f} GiB, activation scratch "
                              f"{eng['scratch_bytes'] / 2**30:.2f} GiB, free-memory drop at load "
                              f"{eng['loaded_bytes'] / 2**30:.2f} GiB (ONNX weights {eng.get('onnx_weights')}, "
                              f"build {eng.get('build_seconds')} s{', cached' if eng.get('cached') else ''}). "
                              f"PyTorch fp16 UNet parameters {unet['torch_memory']['param_bytes'] / 2**30:.2f} GiB."]
            elif "skipped" in eng:
                lines += ["", f"TensorRT: skipped ({eng['skipped']})."]
            lines.append("")
        elif unet:
            lines += [f"UNet: {unet.get('skipped') or unet.get('error')}", ""]
        runs = {**sec.get("e2e", {}).get("runs", {}), **sec.get("diffusers", {}).get("runs", {})}
        if runs:
            steps = sec.get("e2e", {}).get("steps") or sec.get("diffusers", {}).get("steps")
            lines += [f"| whole image ({steps} steps) | ms | ms/step |", "|---|---|---|"]
            labels = {"trt_acfg_concurrent": "TensorRT UNet, ACFG, branches on 2 streams",
                      "trt_acfg_serial": "TensorRT UNet, ACFG, branches in turn",
                      "trt_cfg": "TensorRT UNet, plain CFG (batch 2)",
                      "torch_acfg": "PyTorch fp16 UNet, ACFG", "torch_cfg": "PyTorch fp16 UNet, plain CFG",
                      "diffusers_lora_unfused": "diffusers fp16, 2 LoRAs unfused (PEFT), CFG",
                      "diffusers_lora_fused": "diffusers fp16, 2 LoRAs fused, CFG"}
            for name, r in runs.items():
                lines.append(f"| {labels.get(name, name)} | {r['median_ms']:.0f} | {r.get('per_step_ms', '-')} |")
            lines += ["", "Text encoders and VAE decoder are PyTorch fp16 in every row.", ""]
        for name in ("e2e", "diffusers"):
            s = sec.get(name, {})
            if "skipped" in s or "error" in s:
                lines += [f"{name}: {s.get('skipped') or s.get('error')}", ""]
    ratios = record.get("ratios", {})
    if ratios:
        lines += ["## Ratios", "", "| arch | ratio | value |", "|---|---|---|"]
        for arch, r in ratios.items():
            for k, v in r.items():
                lines.append(f"| {arch} | {k} | {v} |")
        lines.append("")
    tr = record.get("triton")
    if tr:
        lines += ["## Through Triton", ""]
        if "concurrency" in tr:
            lines += [f"Repository {tr['repo']} ({tr['arch']}, runner {tr['runner']}), request {tr['request']}.", "",
                      "| concurrency | images/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
            for c, row in tr["concurrency"].items():
                lines.append(f"| {c} | {row['images_per_s']} | {row.get('p50_ms', '-')} | {row.get('p99_ms', '-')} | {row['errors']} |")
        else:
            lines.append(f"{tr.get('skipped') or tr.get('error')}")
        lines.append("")
    return "\n".join(lines)


def write_results(record: dict, out: Path, device_name: str, date: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = results_path(out, device_name, date, ".json")
    if path.is_file() and "skipped" not in record:
        try:
            record = merge(json.loads(path.read_text()), record)
        except (OSError, ValueError):
            pass
    if "skipped" not in record:
        record["ratios"] = summary_ratios(record)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    results_path(out, device_name, date, ".md").write_text(markdown(record))
    return path


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (same sizes and steps)")
    p.add_argument("--arch", default="sd15,sdxl", help="comma list of sd15, sdxl")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--triton", action="store_true", help="also measure through tritonserver (optional)")
    p.add_argument("--triton-repo", help="a repository exported with --runtime tensorrt (default: tiny demo)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--cache", type=Path, default=None, help="ONNX / engine cache (default $CRAFT_CACHE_DIR/gpu-bench)")
    p.add_argument("--onnx-weights", choices=("fp32", "fp16"), default="fp32",
                   help="weights in the exported ONNX (fp32: exactly what craft export writes)")
    p.add_argument("--lora-rank", type=int, default=64, help="rank of the two diffusers LoRAs (paper: 64)")
    p.add_argument("--steps-sd15", type=int, default=STEPS["sd15"])
    p.add_argument("--steps-sdxl", type=int, default=STEPS["sdxl"])
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="whole images without CUDA graphs in the TensorRT sessions")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CPU dry run of the code paths
    args = p.parse_args(argv)
    args.arches = [a for a in args.arch.split(",") if a]
    args.section_list = [s for s in args.sections.split(",") if s]
    for a in args.arches:
        if a not in ARCHES:
            p.error(f"--arch: {a!r} is not one of {ARCHES}")
    for s in args.section_list:
        if s not in SECTIONS:
            p.error(f"--sections: {s!r} is not one of {SECTIONS}")
    args.steps = {"sd15": args.steps_sd15, "sdxl": args.steps_sdxl}
    if args.cache is None:
        root = Path(os.environ.get("CRAFT_CACHE_DIR", Path.home() / ".cache" / "craft"))
        args.cache = root / "gpu-bench"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    date = datetime.date.today().strftime("%Y%m%d")
    if not torch.cuda.is_available() and not args.tiny:
        record = {"skipped": "no CUDA GPU", "date": now(), "host": platform.node(), "torch": torch.__version__}
        path = write_results(record, args.out, "no-gpu", date)
        print(json.dumps({"skipped": "no CUDA GPU"}))
        print(f"no CUDA GPU: nothing measured; wrote {path}")
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.tiny:
        device, dtype, device_name = torch.device("cpu"), torch.float32, "cpu-tiny"
        state: dict[str, Any] = {"device": {"name": device_name, "uuid": "cpu"}}
        args.steps = {"sd15": 3, "sdxl": 2}
        args.lora_rank = 4
        SIZE.update(sd15=64, sdxl=64)  # a dry run of the code paths on tiny models, not a measurement
    else:
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.float16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        state = {"device": device_info(device)}
        device_name = state["device"]["name"]
    state["runtimes"], state["runtimes_missing"] = set(), {}
    if args.tiny:
        state["runtimes_missing"]["trt"] = "tiny CPU dry run"
    elif have("tensorrt"):
        state["runtimes"].add("trt")
    else:
        state["runtimes_missing"]["trt"] = "tensorrt is not installed (pip install 'craft-lora-serve[gpu]')"
    record: dict[str, Any] = {"schema": SCHEMA, "date": now(), "device": state["device"], "software": software_info(),
                              "runs": [{"started": now(), "argv": sys.argv[1:] if argv is None else list(argv)}],
                              "arches": {}}
    say(f"device {device_name}; sections {args.section_list}; arches {args.arches}; cache {args.cache}")
    if device.type == "cuda":
        record["ceilings"] = state["ceilings"] = measure_ceilings(device, args.quick)
        say(f"ceilings: {state['ceilings']}")
    for arch in args.arches:
        say(f"{arch}: building full-size models (random weights, {str(dtype).replace('torch.', '')})")
        parts = Parts(arch, args.cache / arch, device, dtype, tiny=args.tiny)
        sections: dict[str, Any] = {}
        record["arches"][arch] = sections
        for name, fn in (("unet", bench_unet), ("e2e", bench_e2e), ("diffusers", bench_diffusers)):
            if name in args.section_list:
                section_guard(sections, name, lambda fn=fn: fn(parts, state, args))
                write_results(json.loads(json.dumps(record, default=str)), args.out, device_name, date)
        for session in state.pop("trt_sessions", {}).values():
            session.close()
        parts = None  # noqa: F841 - drop the models before the next arch
        free_memory(device)
    if args.triton:
        holder: dict[str, Any] = {}
        section_guard(holder, "triton", lambda: bench_triton(state, args))
        record["triton"] = holder["triton"]
    record["runs"][0]["finished"] = now()
    path = write_results(record, args.out, device_name, date)
    print(markdown(json.loads(path.read_text())))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
