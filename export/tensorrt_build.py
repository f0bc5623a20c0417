"""TensorRT engines from the exported ONNX files: build the W_init UNet refittable, refit variants.

A UNet variant differs from W_init only in routed weights (Eq. 8), so its engine is the
W_init engine with those weights refitted instead of a full build. Text
encoders and the VAE decoder are plain builds. Every engine is checked against ONNX
Runtime on the spec's seeded inputs; the error is recorded in the manifest, and a non-finite
one or one above the tolerance fails the export. Per-network precision, profile batch, fp32
layers and tolerances: :mod:`.trt_policy`.

Needs the ``gpu`` extra (``tensorrt``) and an NVIDIA GPU; :func:`check_tensorrt_available`
fails before anything is written otherwise. Written against the TensorRT 10 Python API.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .trt_policy import (ENGINE_TOLERANCE, TensorRTError, check_engine_error, engine_precision, engine_profile,
                         fp32_layer_names, output_errors)

log = logging.getLogger(__name__)

__all__ = ["TensorRTError", "check_tensorrt_available", "build_engine", "EngineBuild"]

ENGINE_FILE = "model.plan"


def check_tensorrt_available() -> None:
    """Raise (before any file is written) unless tensorrt imports and a CUDA GPU is visible."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTError("--runtime tensorrt needs the tensorrt package: pip install 'craft-lora-serve[gpu]'") from exc
    log.debug("tensorrt %s", tensorrt.__version__)
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("--runtime tensorrt needs an NVIDIA GPU (torch.cuda.is_available() is False)")


def _cache_dir() -> Path:
    root = Path(os.environ.get("CRAFT_CACHE_DIR", Path.home() / ".cache" / "craft"))
    root.mkdir(parents=True, exist_ok=True)
    return root


class EngineBuild:
    """Build and refit helpers around one TensorRT logger and timing cache."""

    def __init__(self, precision: str):
        import tensorrt as trt

        from .trt_session import trt_logger

        self.trt = trt
        self.precision = precision
        self.logger = trt_logger()  # the process-wide logger TrtSession uses too
        self.cache_path = _cache_dir() / f"trt-timing-{trt.__version__}.cache"

    def _config(self, builder, refittable: bool):
        trt = self.trt
        config = builder.create_builder_config()
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        if refittable:
            config.set_flag(trt.BuilderFlag.REFIT)
        blob = self.cache_path.read_bytes() if self.cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=True)
        return config, cache

    def _keep_fp32(self, network, config) -> list[str]:
        """Constrain the layers :func:`.trt_policy.fp32_layer_names` picks to fp32 (their float outputs too).

        Layers with a non-float output (shape arithmetic) are left alone. With any layer constrained
        the builder must obey (``OBEY_PRECISION_CONSTRAINTS``), not merely prefer.
        """
        trt = self.trt
        chosen = set(fp32_layer_names([network.get_layer(i).name for i in range(network.num_layers)], self.precision))
        kept = []
        for i in range(network.num_layers):  # plain loops and assignments: tests/trt_api_scan.py follows them
            layer = network.get_layer(i)
            if layer.name not in chosen:
                continue
            dtypes = [layer.get_output(j).dtype for j in range(layer.num_outputs)]
            if not all(d in (trt.float32, trt.float16) for d in dtypes):
                continue
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            kept.append(layer.name)
        if kept:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            log.info("TensorRT: %d layers kept in fp32 (%s ...)", len(kept), kept[0])
        return kept

    def build(self, onnx_path: Path, profile: Mapping[str, Any], *, refittable: bool) -> bytes:
        """Serialized engine for an ONNX file with one optimisation profile (min/opt/max per input)."""
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTError(f"{onnx_path}: ONNX parse failed: {errors}")
        config, cache = self._config(builder, refittable)
        self._keep_fp32(network, config)
        opt = builder.create_optimization_profile()
        for name, p in profile.items():
            opt.set_shape(name, p.min, p.opt, p.max)
        config.add_optimization_profile(opt)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise TensorRTError(f"{onnx_path}: TensorRT build failed (see the TensorRT log above)")
        self.cache_path.write_bytes(memoryview(cache.serialize()))
        return bytes(engine)

    def refit(self, base_engine: bytes, onnx_path: Path) -> bytes:
        """The base engine with every refittable weight taken from ``onnx_path`` (same graph).

        TensorRT's ONNX parser refitter (``OnnxParserRefitter``, TensorRT >= 10.0) reads the variant
        file and its external data itself and derives each engine weight exactly as the parser did
        at build time (initializers, ``Constant`` nodes and weights the parser made, in the layout
        the engine holds), so no weight passes through Python. A variant graph is the base graph
        with initializers replaced (:mod:`.onnx_variants`); any other graph fails the refit.
        """
        trt = self.trt
        if not hasattr(trt, "OnnxParserRefitter"):
            raise TensorRTError(f"tensorrt {trt.__version__} has no OnnxParserRefitter; refit needs TensorRT >= 10.0")
        runtime = trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(base_engine)
        if engine is None:
            raise TensorRTError(f"{onnx_path}: cannot deserialize the base engine (see the TensorRT log above)")
        refitter = trt.Refitter(engine, self.logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
            raise TensorRTError(f"{onnx_path}: refit from ONNX failed (engine not built from this graph?): {errors}")
        missing = refitter.get_missing_weights()
        if missing:
            raise TensorRTError(f"{onnx_path}: refit is missing weights {list(missing)[:3]}")
        if not refitter.refit_cuda_engine():
            raise TensorRTError(f"{onnx_path}: refit failed (see the TensorRT log above)")
        return bytes(engine.serialize())


def _compare_with_onnx(engine_bytes: bytes, onnx_path: Path, spec, hw: tuple[int, int]) -> dict[str, dict[str, float]]:
    """Per output, |TensorRT - ONNX Runtime| on seeded inputs (batch 2, or the spec's max): :func:`output_errors`."""
    from .onnx_export import example_inputs
    from .ort import OrtSession
    from .trt_session import TrtSession

    batch = min(2, spec.max_batch)
    if spec.kind == "unet_lora":  # banks of batch + 1 slots, random slots and gates per sample
        from .runtime_export import runtime_examples

        examples = runtime_examples(spec, hw, batch, batch + 1, seed=5)
    else:
        examples = example_inputs(spec, hw=hw, batch=batch, seed=5)
    inputs = {k: v.numpy() for k, v in examples.items()}
    ref = OrtSession(onnx_path)(inputs)
    session = TrtSession(engine_bytes)
    try:
        got = session(inputs)
    finally:
        session.close()
    return output_errors(got, {t.name: ref[t.name] for t in spec.outputs})


def build_engine(job, onnx_path: Path, spec, options, out_dir: Path, *, image_range=None,
                 base_engine: bytes | None = None) -> dict:
    """Write ``out_dir/model.plan`` for a job; returns the manifest fields (build/refit seconds, error).

    ``base_engine``: the serialized W_init UNet engine (built refittable); a UNet variant given
    one is that engine refitted with its own weights, anything else is a full build. Raises
    :class:`TensorRTError` when the engine's outputs are not finite or off ONNX Runtime's by more
    than :data:`.trt_policy.ENGINE_TOLERANCE` (the export stops; the repository is unchanged).
    """
    from .specs import ImageRange

    precision = engine_precision(spec.arch, job.network, options.precision)
    builder = EngineBuild(precision)
    image_range = image_range or ImageRange.default(spec.arch)
    t0 = time.perf_counter()
    is_variant = job.network == "unet" and not job.variants[0].is_base
    if is_variant and base_engine is not None:
        engine, how = builder.refit(base_engine, onnx_path), "refit"
    else:
        profile = engine_profile(spec, job.network, image_range)  # unet_lora: + the bank slots S
        engine = builder.build(onnx_path, profile, refittable=job.network == "unet")
        how = "build"
    seconds = time.perf_counter() - t0
    (out_dir / ENGINE_FILE).write_bytes(engine)
    errors = _compare_with_onnx(engine, onnx_path, spec, image_range.min_hw)
    abs_errs = [e["max_abs_err"] for e in errors.values()]
    err = math.nan if any(math.isnan(x) for x in abs_errs) else max(abs_errs)  # max() would drop a NaN
    log.info("%s: TensorRT %s (%s) in %.1f s, max |trt - ort| = %.3g", job.name, how, precision, seconds, err)
    rel = check_engine_error(job.name, precision, errors)
    return {"trt_build": how, "trt_seconds": round(seconds, 3), "trt_max_abs_err_vs_onnx": err,
            "trt_rel_err_vs_onnx": rel, "trt_tolerance": ENGINE_TOLERANCE[precision],
            "trt_precision": precision, "trt_engine_bytes": len(engine)}
