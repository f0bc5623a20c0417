"""One model of the repository: export (or derive) its ONNX graph, check it, build its engine, write its config.

A UNet variant (Eq. 8 weights) is derived from the W_init graph by replacing the weights it
changes (:mod:`.onnx_variants`); everything else is traced and exported. Every graph is checked
against the PyTorch network on seeded inputs; with ``--runtime tensorrt`` the engine is built
(or, for a variant, refitted from the W_init engine) and checked against ONNX Runtime.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from .bake import VariantBaker
from .loading import unet_weights
from .memory import phase
from .networks import PipelineNets
from .options import ExportError, ExportOptions, ModelJob
from .recipe import EngineRange
from .repo_files import templates
from .specs import ImageRange, NetworkSpec

log = logging.getLogger(__name__)

__all__ = ["PARITY_TOLERANCE", "ExportWeights", "adopt_weights", "build_model", "engine_path", "network_module",
           "trim_memory"]

# Max |ONNX Runtime - PyTorch| accepted per network in fp32 (the measured errors are orders of
# magnitude below; each model's own is recorded in the manifest).
PARITY_TOLERANCE = {"unet": 1e-4, "text_encoder": 1e-4, "text_encoder_2": 1e-4, "vae_decoder": 1e-4, "unet_lora": 1e-4}


def network_module(nets: PipelineNets, baker: VariantBaker, job: ModelJob) -> tuple[torch.nn.Module, dict]:
    """The nn.Module to export for a job and its parameter overrides (baked variant weights)."""
    if job.network == "unet":
        return nets.unet, baker.params_for(job.variants[0], cache=False)  # baked once: not kept
    if job.network == "vae_decoder":
        return nets.vae, {}
    return nets.text_encoders[0 if job.network == "text_encoder" else 1], {}


class _Baked(torch.nn.Module):
    """A network with some parameters replaced (``functional_call``): no copy, the module is untouched."""

    def __init__(self, module: torch.nn.Module, params: Mapping[str, torch.Tensor]):
        super().__init__()
        self.inner = module
        self.params = dict(params)

    @property
    def overrides(self) -> dict[str, torch.Tensor]:
        """The replaced parameters under their names in this module's graph (``inner.`` prefix)."""
        return {f"inner.{k}": v for k, v in self.params.items()}

    def forward(self, *args, **kwargs):
        if not self.params:
            return self.inner(*args, **kwargs)
        return torch.func.functional_call(self.inner, self.params, args, kwargs, strict=False)


# :meth:`ExportWeights.adopt` drops the file pages it has compared (and returns the replaced weights' heap)
# after each this many bytes.
ADOPT_RELEASE_BYTES = 256 * 2**20


class ExportWeights:
    """The networks' weights during an export, held once: in PyTorch or in ONNX Runtime, not both.

    Once a network is exported (or found unchanged in the repository), its parameters are pointed
    at the weights in its ONNX data file (:class:`~craft_export.onnx_files.MappedWeights`, checked
    byte-equal first): the loaded copy is freed and the file's pages serve PyTorch. :meth:`release`
    drops those pages from the process before an ONNX Runtime session is opened; PyTorch reads them
    back from the file (the page cache) the next time it runs.
    """

    def __init__(self) -> None:
        self._mapped: list = []

    def adopt(self, module: torch.nn.Module, onnx_path: Path, prefix: str = "inner.") -> int:
        """Point ``module``'s parameters (``prefix`` + name: the initializer names of a :class:`_Baked`
        export) at ``onnx_path``'s weights where they are byte-equal; returns the bytes moved.

        A replaced parameter's memory is freed at once only if nothing else holds it (the caller drops
        its own references first). The file's pages read by the comparison go back every
        :data:`ADOPT_RELEASE_BYTES`, with the freed heap: resident memory stays near the weights
        held once, instead of the loaded copy plus the file's pages."""
        from .onnx_files import MappedWeights

        mapped = MappedWeights(onnx_path)
        moved = read = 0
        for name, param in module.named_parameters():
            tensor = mapped.tensors.get(prefix + name)
            if tensor is None or tensor.shape != param.shape or tensor.dtype != param.dtype:
                continue
            if torch.equal(tensor, param.detach()):
                param.data = tensor
                moved += tensor.nbytes
            read += tensor.nbytes
            if read >= ADOPT_RELEASE_BYTES:
                read = 0
                mapped.release()
                trim_memory(collect=False)
        if moved:
            self._mapped.append(mapped)
            log.info("%s: %.2f GB of weights now read from the exported file", onnx_path, moved / 2**30)
        mapped.release()
        trim_memory()
        return moved

    def release(self) -> None:
        """Drop the adopted weights' pages from resident memory (and return freed heap to the system)."""
        for mapped in self._mapped:
            mapped.release()
        trim_memory()


def adopt_weights(job: ModelJob, nets: PipelineNets, baker: VariantBaker, onnx_path: Path,
                  weights: ExportWeights) -> None:
    """After ``job``'s network was exported to (or found unchanged at) ``onnx_path``: its weights move onto
    the file (:class:`ExportWeights`). Only a traced network's graph holds all of its parameters by name."""
    if job.network == "unet_lora" or job.is_variant:
        return
    if job.network != "unet":
        module, _ = network_module(nets, baker, job)
        weights.adopt(module, onnx_path)
        return
    # the baker's W_init references every Linear/Conv weight: held, the loaded copy could not be freed
    # while the file's pages come in (both copies resident at once: the full-size SD 1.5 export's 7.2 GiB peak)
    baker.W_init = {}
    try:
        weights.adopt(nets.unet, onnx_path)
    finally:
        baker.W_init = unet_weights(nets.unet.unet)  # the baker reads W_init from the file's pages too


def trim_memory(*, collect: bool = True) -> None:
    """Collect garbage (unless not ``collect``) and return the C heap's free pages to the system
    (glibc ``malloc_trim``)."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _examples(spec: NetworkSpec, hw: tuple[int, int], batch: int, seed: int) -> dict[str, torch.Tensor]:
    from .onnx_export import example_inputs
    from .runtime_export import runtime_examples

    if spec.kind == "unet_lora":  # banks of batch + 1 slots, random slots and gates per sample
        return runtime_examples(spec, hw, batch, batch + 1, seed)
    return example_inputs(spec, hw=hw, batch=batch, seed=seed)


# Largest image side (px) of the parity check's inputs. Every graph has dynamic batch and image axes and
# the same weights at every size, so a smaller image checks the same graph; the cost is what is not the
# same: the activations. At SD 1.5's 512 px, batch 2, ONNX Runtime's attention scores alone (unfused
# MatMul-Softmax-MatMul, 4096 tokens) take 2 x 1.07 GB, about 16x their size at 256 px.
PARITY_MAX_SIDE = 256


def _parity_inputs(spec: NetworkSpec, engine: EngineRange) -> list[dict[str, torch.Tensor]]:
    """Seeded inputs at two batch sizes and two image sizes: batch 2 square, batch 1 wide (3:2).

    The square side is the engine range's smallest, at most :data:`PARITY_MAX_SIDE` px (the tiny
    models' ranges lie below it; full-size ones are checked at 256 and 256x384 px): the activations
    of a full-size network at its engine sizes would outweigh its weights. The two cases differ in
    batch and width, so a size the trace baked into the graph fails one of them.
    """
    lo = min(engine.min_size, PARITY_MAX_SIDE)
    wide = min(engine.max_size, (lo * 3 // 2) // 8 * 8)
    return [_examples(spec, (lo, lo), 2, 1), _examples(spec, (lo, wide), 1, 2)]


def build_model(job: ModelJob, nets: PipelineNets, baker: VariantBaker, engine: EngineRange, options: ExportOptions,
                runner: str, staging: Path, specs: Mapping[str, NetworkSpec], base_onnx: Path | None = None,
                base_engine: Path | None = None, weights: ExportWeights | None = None) -> dict:
    """Export one model into ``staging/<name>``, check it against PyTorch, return its manifest record.

    ``base_onnx``: the W_init UNet graph variants are derived from; ``base_engine``: its
    ``model.plan``, refitted into a variant's engine (``--runtime tensorrt``), when there is one.
    ``weights``: the export's :class:`ExportWeights` (a traced network's parameters move onto its
    exported file, and are dropped from memory while ONNX Runtime checks a graph).
    """
    from .onnx_export import export_onnx
    from .onnx_variants import derive_variant
    from .parity import compare_outputs, reference_outputs

    from .unet_runner import UNET_RUNNER, served_by_runner, write_changed, write_runner

    if job.network == UNET_RUNNER:  # no weights of its own: the config and the runner's model.py
        return {**write_runner(staging / job.name, specs["unet"], engine.max_batch, runtime=options.runtime),
                "key": job.key}

    weights = weights or ExportWeights()
    # 1. the graph: derived from W_init's, or traced
    spec = specs[job.network]
    if job.network == "unet_lora":  # W_init + runtime LoRA branches (:mod:`.runtime_network`)
        from .runtime_network import RuntimeUNetNet

        # TensorRT: the dense graph (static shapes; trt_policy.profile_slots); ONNX Runtime: active rows only
        net, params = RuntimeUNetNet(nets.unet, spec, compact=options.runtime != "tensorrt").eval(), {}
    else:
        with phase("bake"):
            module, params = network_module(nets, baker, job)
            net = _Baked(module, params).eval()
            weights.release()  # baking read W_init's pages of the routed modules: the parity run needs the others
    target = staging / job.name
    shutil.rmtree(target, ignore_errors=True)
    (target / "1").mkdir(parents=True)
    onnx_path = target / "1" / "model.onnx"
    size = engine.min_size
    t0 = time.perf_counter()
    if base_onnx is not None and params:
        with phase("derive"):
            derive_variant(base_onnx, net.overrides, onnx_path)
            write_changed(onnx_path.parent, net.overrides)  # the runner shares every other weight with W_init
        how = "derived"
    else:
        export_onnx(net, spec, _examples(spec, (size, size), 2, 0), onnx_path)  # phases "trace", "save"
        how = "traced"
        if job.network != "unet_lora":  # from now on the weights are the exported file's pages
            with phase("adopt"):
                adopt_weights(job, nets, baker, onnx_path, weights)
    seconds = time.perf_counter() - t0
    # 2. parity with PyTorch: its outputs first, then the network's memory goes before ONNX Runtime's comes
    inputs = _parity_inputs(spec, engine)
    with phase("parity_torch"):
        refs = reference_outputs(net, spec, inputs)
        del net, params
        weights.release()
    with phase("parity_ort"):
        report = compare_outputs(onnx_path, spec, inputs, refs)
        trim_memory()
    tolerance = PARITY_TOLERANCE[job.network]
    if report["worst_abs_err"] > tolerance:
        raise ExportError(f"{job.name}: ONNX Runtime differs from PyTorch by {report['worst_abs_err']:.3g} "
                          f"> tolerance {tolerance:g}")
    record = {"network": job.network, "key": job.key, "export_seconds": round(seconds, 3), "export": how,
              "parity_max_abs_err": report["max_abs_err"], "parity_tolerance": tolerance}
    if job.network == "unet_lora" or (job.network == "unet" and served_by_runner(
            {"runner": runner, "runtime": options.runtime, "lora_mode": options.lora_mode})):
        # weights only: read by the ``unet`` runner model (TensorRT: its model.plan, beside model.onnx
        # for the runtime network and W_init; a variant's ONNX goes once its engine is refitted)
        if options.runtime == "tensorrt":
            with phase("tensorrt"):
                record.update(_tensorrt(job, onnx_path, spec, engine, options, target, base_engine))
        return record
    # 3. the TensorRT engine
    if options.runtime == "tensorrt":
        with phase("tensorrt"):
            record.update(_tensorrt(job, onnx_path, spec, engine, options, target, base_engine))
    # 4. config.pbtxt
    _write_model_config(job, spec, target, runner, options, engine.max_batch)
    return record


def _tensorrt(job: ModelJob, onnx_path: Path, spec: NetworkSpec, engine: EngineRange, options: ExportOptions,
              target: Path, base_engine: Path | None) -> dict:
    from .tensorrt_build import build_engine

    image_range = ImageRange((engine.min_size,) * 2, (engine.opt_size,) * 2, (engine.max_size,) * 2)
    refit_from = base_engine.read_bytes() if job.is_variant and base_engine is not None else None
    record = build_engine(job, onnx_path, spec, options, target / "1", image_range=image_range, base_engine=refit_from)
    if job.is_variant and not options.keep_onnx:
        for f in onnx_path.parent.glob("model.onnx*"):  # the graph and its external data
            f.unlink()
        record["onnx_removed"] = True
    return record


def _write_model_config(job: ModelJob, spec: NetworkSpec, target: Path, runner: str, options: ExportOptions,
                        max_batch: int) -> None:
    from .triton_config import config_pbtxt

    if options.runtime == "tensorrt":
        platform = "tensorrt_plan" if runner == "native" else "python"
    else:
        platform = "onnxruntime" if runner == "native" else "python"
    parameters = {"craft_runtime": options.runtime, "craft_network": job.network}
    if platform == "python" and options.runtime == "tensorrt":
        # GPU-resident inputs stay on the GPU; torch tensors in and out through DLPack (EngineModel)
        parameters.update(craft_io="dlpack", FORCE_CPU_ONLY_INPUT_TENSORS="no")
    # UNet models batch whatever is already queued but never wait for more: a batching window
    # costs its length on every call and bought no throughput on CPU (README, "Concurrency").
    text = config_pbtxt(job.name, spec, platform=platform, max_batch_size=max_batch,
                        instance_kind="KIND_GPU" if options.runtime == "tensorrt" else "KIND_CPU",
                        dynamic_batching=job.network == "unet", max_queue_delay_us=0 if job.network == "unet" else None,
                        parameters=parameters)
    (target / "config.pbtxt").write_text(text)
    if platform == "python":
        shutil.copy(templates() / "engine_runner" / "model.py", target / "1" / "model.py")


def engine_path(model_dir: Path, options: ExportOptions) -> Path | None:
    """A model folder's TensorRT engine, when exporting for TensorRT and the engine is there."""
    if options.runtime != "tensorrt":
        return None
    from .tensorrt_build import ENGINE_FILE

    path = model_dir / "1" / ENGINE_FILE
    return path if path.is_file() else None
