"""How each TensorRT engine is built and when it is accepted, as pure functions (no tensorrt, no GPU).

:mod:`.tensorrt_build` applies these; keeping them here lets CPU tests cover every decision.

* :func:`engine_precision`: the precision a network's engine is built in. ``--precision fp16``
  builds the SDXL VAE decoder in fp32 (TensorRT's default TF32 matrix products allowed): it
  overflows fp16 (NaN / black images), which is why NVIDIA's own diffusion demo and diffusers'
  ``force_upcast`` keep it in fp32. SD 1.5's decoder stays fp16, as everywhere else.
* :func:`profile_batch`: the optimisation profile's batch range. A UNet's ``opt`` is 2: every
  guided step (CFG, or ACFG's two branches when their weights agree) runs at batch 2, so that is
  the shape TensorRT tunes its tactics for; 1 stays the minimum.
* :func:`profile_slots` / :func:`engine_profile`: the runtime-LoRA UNet (``unet_lora``, ``--lora-mode
  runtime``) takes its factor banks as inputs of shape ``(S, ...)``, ``S`` = slots of the runner's
  LoRA cache (slot 0 = no LoRA). The runner passes its whole banks on every call, so ``S`` is fixed
  per runner by its cache budget: ``opt`` = the slots of the default budget
  (:data:`RUNTIME_CACHE_MB` / the layout's bytes per content + style slot, clamped to [2, 256]),
  ``min`` 2 (the smallest cache: slot 0 + one LoRA of each kind), ``max`` :data:`RUNTIME_MAX_SLOTS`
  (the cache's cap, for a runner given a larger budget). The bank inputs only feed Gathers by slot
  index, so the range costs no tactic quality. Batch as the UNet's (``opt`` 2: ACFG's conditional
  and unconditional rows in one call). The engine is built from the dense runtime graph (every
  sample through every branch, no data-dependent shapes: ``RuntimeUNetNet(compact=False)``).
  Unverified on a GPU: written against the TensorRT 10 API and unit-tested on CPU only.
* :func:`fp32_layer_names`: the UNet layers kept in fp32 in an fp16 / bf16 build: the sinusoidal
  timestep embedding (``time_proj``: ``sin(t * f)`` with ``t`` up to ~1000, where fp16's spacing
  there, 0.5, is a large error in the argument) and its MLP (``time_embedding``), and SDXL's
  ``time_ids`` embedding (``add_time_proj``, sizes up to ~1500 px; ``add_embedding``). Layers are
  found by the module path the ONNX exporter writes into node names (``/inner/time_proj/Sin``),
  which TensorRT's ONNX parser keeps as layer names.
* :func:`output_errors` / :func:`check_engine_error`: the engine's outputs against ONNX Runtime
  on seeded inputs; a non-finite error, or one above :data:`ENGINE_TOLERANCE`, fails the export.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import numpy as np

from .specs import BatchRange, ImageRange, NetworkSpec, ShapeProfile

__all__ = ["TensorRTError", "POLICY_VERSION", "ENGINE_TOLERANCE", "FP32_MODULES", "engine_precision", "profile_batch",
           "RUNTIME_CACHE_MB", "RUNTIME_MAX_SLOTS", "profile_slots", "engine_profile",
           "fp32_layer_names", "output_errors", "check_engine_error"]


# Part of every TensorRT model's content key (craft export): raise it when a decision here changes
# what an engine is, so re-exports rebuild engines made under the old rule instead of reusing them.
POLICY_VERSION = 1


class TensorRTError(ValueError):
    """TensorRT is unavailable, failed to build / refit an engine, or built a wrong one."""


# Accepted max |TensorRT - ONNX Runtime| of an output, relative to that output's largest
# |ONNX Runtime| value, per engine precision. fp32 engines may run TF32 (10-bit mantissa) matrix
# products; fp16 / bf16 engines are compared with the fp32 graph (bf16: 8-bit mantissa). Numbers
# chosen from the formats' rounding, not yet measured on a GPU.
ENGINE_TOLERANCE = {"fp32": 1e-2, "fp16": 5e-2, "bf16": 1e-1}

# Modules of diffusers' UNet2DConditionModel whose layers stay fp32 under fp16 / bf16.
FP32_MODULES = ("time_proj", "time_embedding", "add_time_proj", "add_embedding")
_FP32_LAYER = re.compile(r"(?:^|/)(?:%s)(?:/|$)" % "|".join(map(re.escape, FP32_MODULES)))


def engine_precision(arch: str, network: str, precision: str) -> str:
    """The precision ``network``'s engine is built in when the export asks for ``precision``."""
    if precision not in ENGINE_TOLERANCE:
        raise TensorRTError(f"precision must be one of {sorted(ENGINE_TOLERANCE)}, got {precision!r}")
    if arch == "sdxl" and network == "vae_decoder" and precision == "fp16":
        return "fp32"  # overflows in fp16
    return precision


def profile_batch(network: str, max_batch: int) -> BatchRange:
    """min / opt / max batch of a network's optimisation profile (UNet: opt 2, guided steps' batch)."""
    if max_batch < 1:
        raise TensorRTError(f"max_batch must be >= 1, got {max_batch}")
    opt = min(2, max_batch) if network in ("unet", "unet_lora") else 1
    return BatchRange(1, opt, max_batch)


# The runtime-LoRA runner's cache (serving/lora_cache.py MAX_SLOTS, serving/runtime_unet.py
# DEFAULT_CACHE_MB; tests/test_runtime_trt.py holds them equal): export does not import serving.
RUNTIME_MAX_SLOTS = 256
RUNTIME_CACHE_MB = 256.0


def profile_slots(slot_bytes: int, cache_mb: float = RUNTIME_CACHE_MB) -> BatchRange:
    """min / opt / max of the bank slot axis ``S`` (module docstring); ``slot_bytes``: one content + one style slot."""
    if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int) or slot_bytes < 1:
        raise TensorRTError(f"slot_bytes must be a positive integer, got {slot_bytes!r}")
    if not cache_mb > 0:
        raise TensorRTError(f"cache_mb must be > 0, got {cache_mb!r}")
    opt = max(2, min(RUNTIME_MAX_SLOTS, int(cache_mb * 2**20) // slot_bytes))
    return BatchRange(2, opt, RUNTIME_MAX_SLOTS)


def engine_profile(spec: NetworkSpec, network: str, image_range: ImageRange,
                   cache_mb: float = RUNTIME_CACHE_MB) -> dict[str, ShapeProfile]:
    """The optimisation profile of ``network``'s engine: batch (:func:`profile_batch`), image range, and
    for the runtime-LoRA UNet the bank slots (:func:`profile_slots`)."""
    batch = profile_batch(network, spec.max_batch)
    if network != "unet_lora":
        return spec.profile(image_range, batch)
    from craft_ops.runtime_lora import RuntimeLayout

    layout = RuntimeLayout.from_json(spec.meta["runtime_layout"])
    slot_bytes = 4 * (layout.slot_floats("content") + layout.slot_floats("style"))
    return spec.profile(image_range, batch, symbols={"S": profile_slots(slot_bytes, cache_mb)})


def fp32_layer_names(names: Iterable[str], precision: str) -> list[str]:
    """The layers (by name, in the order given) to constrain to fp32 in a ``precision`` build.

    Nothing in an fp32 build. Otherwise every layer inside a :data:`FP32_MODULES` module, matched
    on whole path segments: ``/inner/time_proj/Mul`` is one, a resnet's ``time_emb_proj`` is not.
    """
    if precision == "fp32":
        return []
    return [n for n in names if _FP32_LAYER.search(n)]


def output_errors(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: ``max_abs_err`` (NaN or inf when either side is not finite), ``ref_max_abs``, ``rel_err``."""
    missing = sorted(set(ref) - set(got))
    if missing:
        raise TensorRTError(f"the engine gave no output {missing[0]!r}")
    out = {}
    for name, want in ref.items():
        have = np.asarray(got[name], dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        if have.shape != want.shape:
            raise TensorRTError(f"output {name!r}: engine shape {have.shape} != ONNX Runtime shape {want.shape}")
        finite = bool(np.isfinite(have).all() and np.isfinite(want).all())
        err = float(np.abs(have - want).max()) if finite else math.nan
        scale = float(np.abs(want).max()) if np.isfinite(want).all() else math.nan
        rel = err / scale if scale > 0 else (0.0 if err == 0 else (math.inf if finite else math.nan))
        out[name] = {"max_abs_err": err, "ref_max_abs": scale, "rel_err": rel}
    return out


def check_engine_error(model: str, precision: str, errors: Mapping[str, Mapping[str, float]]) -> float:
    """The worst relative error; raises when any output's is non-finite or above the tolerance."""
    tolerance = ENGINE_TOLERANCE[precision]
    worst = 0.0
    for name, e in errors.items():
        rel = e["rel_err"]
        if not (math.isfinite(e["max_abs_err"]) and math.isfinite(e["ref_max_abs"])):
            raise TensorRTError(f"{model}: {precision} engine output {name!r} is not finite (NaN / inf) "
                                f"against ONNX Runtime; export stopped")
        if rel > tolerance:
            raise TensorRTError(f"{model}: {precision} engine output {name!r} differs from ONNX Runtime by "
                                f"{e['max_abs_err']:.3g} = {rel:.3g} of its largest value {e['ref_max_abs']:.3g} "
                                f"> tolerance {tolerance:g}")
        worst = max(worst, rel)
    return worst
