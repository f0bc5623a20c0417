"""gpu_bench section ``unet_lora``: the runtime-LoRA UNet's TensorRT engine vs the baked UNet engine (issue 14).

Written, NOT yet measured (no GPU was available when it was written). Full-size model of the arch
(``gpu_bench.Parts``), max rank ``--lora-rank`` (default 64): the dense runtime graph
(``RuntimeUNetNet(compact=False)``, what ``craft export --runtime tensorrt --lora-mode runtime``
builds) exported in fp32 and built as an fp16 engine with the profile of
:func:`craft_export.trt_policy.engine_profile` (bank slots ``S``: min 2, opt from the runner's default
cache budget, max 256). Timed at the arch's bench size with banks of 3 slots (the Gathers read slots by
index; ``S`` does not change the work):

* ``all_active_b1`` / ``all_active_b2``: every sample with its own content + style LoRA;
* ``acfg_b2``: one ACFG step as the runtime path runs it (conditional row with LoRAs, unconditional
  row at gates 0) in ONE call, against the baked engine's two batch-1 calls (``baked_2x_b1``) and
  its one batch-2 call (``baked_b2``: what a step costs when both branches share weights).
"""

from __future__ import annotations

import json
import time
from typing import Any


def bench_unet_lora(parts, state: dict, args) -> dict:
    import torch

    import gpu_bench as gb
    from craft_export.loading import unet_module_shapes
    from craft_export.onnx_export import export_onnx
    from craft_export.runtime_export import layout_for, runtime_examples
    from craft_export.runtime_network import RuntimeUNetNet, runtime_spec
    from craft_export.tensorrt_build import EngineBuild
    from craft_export.trt_policy import engine_profile
    from craft_export.trt_session import TrtSession
    from craft_ops.routing import PRESETS

    if "trt" not in state["runtimes"]:
        return {"skipped": state["runtimes_missing"].get("trt", "unavailable")}
    baked = gb.trt_session(parts, state, args)
    arch, device, rank = parts.arch, parts.device, int(args.lora_rank)
    spec = runtime_spec(parts.specs["unet"], layout_for(unet_module_shapes(parts.unet), PRESETS[arch], rank))
    folder = args.cache / arch / f"unet_lora_r{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path, plan_path, meta_path = folder / "model.onnx", folder / "model.plan", folder / "build.json"
    image_range = gb.engine_image_range(arch)
    profile = engine_profile(spec, "unet_lora", image_range)
    import tensorrt as trt

    key = {"fingerprint": parts.fingerprint(), "rank": rank, "tensorrt": trt.__version__,
           "profile": {n: [p.min, p.opt, p.max] for n, p in profile.items() if not n.startswith("lora_")}}
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    result: dict[str, Any] = {"max_rank": rank, "modules": len(spec.meta["runtime_layout"]["modules"]),
                              "slots_profile": list(profile["lora_A.0"].min[:1] + profile["lora_A.0"].opt[:1]
                                                    + profile["lora_A.0"].max[:1])}
    if not (plan_path.is_file() and meta.get("key") == key):
        gb.say(f"{arch}: exporting the runtime-LoRA UNet (max rank {rank}, dense graph) -> {onnx_path}")
        t0 = time.perf_counter()
        parts.unet.to(torch.float32)
        try:
            lo = image_range.min_hw
            net = RuntimeUNetNet(parts.unet_net, spec, compact=False).eval()
            inputs = {k: v.to(device) for k, v in runtime_examples(spec, lo, 2, 3, 0).items()}
            export_onnx(net, spec, inputs, onnx_path)
        finally:
            parts.unet.to(parts.dtype)
            gb.free_memory(device)
        export_s = round(time.perf_counter() - t0, 1)
        gb.say(f"{arch}: building the runtime-LoRA TensorRT fp16 engine")
        t0 = time.perf_counter()
        plan_path.write_bytes(EngineBuild("fp16").build(onnx_path, profile, refittable=False))
        meta = {"key": key, "export_seconds": export_s, "build_seconds": round(time.perf_counter() - t0, 1)}
        meta_path.write_text(json.dumps(meta, indent=2))
    result.update(export_seconds=meta.get("export_seconds"), build_seconds=meta.get("build_seconds"),
                  plan_bytes=plan_path.stat().st_size)
    session = TrtSession(plan_path, device=device)
    warmup, reps = (2, 5) if args.quick else (5, 20)
    hw = (gb.SIZE[arch],) * 2
    try:
        def feeds(batch: int, active_rows: list[int]) -> dict:
            x = runtime_examples(spec, hw, batch, 3, seed=batch)
            for kind in ("content", "style"):
                index = torch.zeros(batch, dtype=torch.int64)
                scale = torch.zeros(batch)
                index[active_rows], scale[active_rows] = torch.tensor([1 + r % 2 for r in active_rows]), 1.0
                x[f"{kind}_index"], x[f"{kind}_scale"] = index, scale
            return {k: v.to(device) for k, v in x.items()}

        for name, batch, rows in (("all_active_b1", 1, [0]), ("all_active_b2", 2, [0, 1]), ("acfg_b2", 2, [0])):
            x = feeds(batch, rows)
            result[name] = gb.time_device(lambda: session.run_torch(x, copy=False), warmup=warmup, reps=reps,
                                          device=device)
            gb.say(f"{arch} runtime-LoRA UNet {name}: {result[name]['median_ms']:.2f} ms")
        if baked is not None:
            unet_names = set(parts.specs["unet"].input_names)
            b1 = {k: v for k, v in feeds(1, []).items() if k in unet_names}
            b2 = {k: v for k, v in feeds(2, []).items() if k in unet_names}

            def two_calls():
                baked.run_torch(b1, copy=False)
                baked.run_torch(b1, copy=False)

            result["baked_2x_b1"] = gb.time_device(two_calls, warmup=warmup, reps=reps, device=device)
            result["baked_b2"] = gb.time_device(lambda: baked.run_torch(b2, copy=False), warmup=warmup, reps=reps,
                                                device=device)
            result["acfg_overhead_vs_two_baked_calls"] = round(
                result["acfg_b2"]["median_ms"] / result["baked_2x_b1"]["median_ms"] - 1, 3)
    finally:
        session.close()
        gb.free_memory(device)
    return result
