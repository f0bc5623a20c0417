"""Export the networks of :mod:`craft_export.networks` to ONNX, following a :class:`NetworkSpec`.

The files (``model.onnx`` + ``model.onnx.data``, :mod:`craft_export.onnx_files`) are written into
a temp directory next to the target, checked with ``onnx.checker``, and only then moved into place.

Exporter choice: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) by default
-------------------------------------------------------------------------------------------
Both exporters of torch 2.13 produce correct graphs for the diffusers UNet (SD 1.5 and
SDXL with its ``added_cond_kwargs``), the transformers CLIP text encoders and the VAE
decoder, with dynamic batch and latent axes, and match PyTorch equally well. The TorchScript
exporter is the default because:

* Speed: the dynamo exporter's torch.export + decompositions + symbolic-shape tracing cost a
  fixed amount per graph op, which doesn't shrink with width, and every LoRA weight variant
  traced is one more export (the README's "Export" section has the measured times).
* Weight names: with ``do_constant_folding=False`` every initializer keeps its parameter
  name (``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight``). With
  constant folding (always on in the TorchScript exporter unless turned off, and in the
  dynamo exporter's optimizer) the transposed ``nn.Linear`` weights become anonymous
  initializers (``onnx::MatMul_5692`` / ``val_123``), every attention projection among
  them, i.e. exactly the LoRA targets. Per-variant weight diffs
  (:func:`craft_export.onnx_files.onnx_initializer_hashes`), derived variants and TensorRT
  refit need these names. The leftover ``Transpose``/``Unsqueeze`` of weights and the shape
  arithmetic get folded by ONNX Runtime at session creation and by TensorRT at build time.
* The TorchScript exporter is deprecated upstream (DeprecationWarning) but still present
  and supported in torch 2.13. ``exporter="dynamo"`` is kept working behind the same
  contract (run with ``optimize=False`` so weight names survive too); the tests cover it
  on the text encoder and VAE, and on the UNet when ``CRAFT_SLOW=1``.

Gotchas handled here:

* Latent sizes that aren't a multiple of ``2**num_upsamplers`` (8 for SD 1.5, 4 for
  SDXL, e.g. 96x64 px -> 12x8 latent on SD 1.5). diffusers' UNet checks
  ``dim % 2**num_upsamplers`` in Python and passes explicit ``upsample_size``s only when
  that check fails. Either exporter bakes in the branch the example took, and the usual
  (divisible) example gives a graph whose skip-connection ``Concat`` fails on other sizes.
  :func:`export_onnx` traces the UNet with that check forced on (``num_upsamplers``
  raised during tracing only), so the graph resizes to the skip tensor's runtime size.
  That equals scale-2 nearest upsampling on divisible sizes and matches PyTorch on the rest.
* Size-0/1 specialisation: torch.export fixes any axis whose example size is 0 or 1, and
  the UNet's bottom block is 1x1 for an 8x8 latent (SD 1.5). Export examples must use
  size >= 2 on every dynamic axis (checked), and a latent of at least ``2**(num_down+1)``
  (16 for SD 1.5); e.g. batch 2 at 128x192 px.
* Attention: the models keep diffusers' default ``AttnProcessor2_0`` (SDPA), which exports
  to one MatMul-Softmax-MatMul per head group (opset >= 14). TensorRT fuses that into its
  fused-MHA kernels. ``set_attn_processor(AttnProcessor())`` would give a larger graph
  (baddbmm on an ``empty`` tensor -> ConstantOfShape/Mul/Add, head<->batch reshapes) for
  the same numbers, so don't switch.
* The graph's declared input/output shapes are rewritten from the spec (exact symbolic
  names, static sizes where the exporter lost them, e.g. the text encoder's 77), after
  checking that the exporter didn't bake a symbolic axis into a constant.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .memory import phase
from .onnx_files import consolidate_external_data, iter_initializers, publish_onnx, value_info_dims
from .specs import NetworkSpec

__all__ = [
    "EXPORTERS",
    "DEFAULT_OPSET",
    "ExportResult",
    "export_onnx",
    "example_inputs",
    "check_inputs",
    "eval_mode",
]

EXPORTERS = ("torchscript", "dynamo")
# TorchScript: 17 (native LayerNormalization; TensorRT 8.6+ / 10.x). Dynamo: 18 is its minimum.
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}


@dataclass(frozen=True)
class ExportResult:
    path: Path  # model.onnx
    data_path: Path  # model.onnx.data
    exporter: str
    opset: int
    seconds: float
    num_initializers: int
    num_nodes: int
    data_bytes: int


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------

def example_inputs(spec: NetworkSpec, hw: tuple[int, int] = (64, 64), batch: int = 2,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs matching ``spec`` at ``batch`` and image size ``hw`` (pixels).

    Latents / contexts / pooled embeddings are N(0, 1); timesteps are uniform floats in
    [0, 1000); SDXL ``time_ids`` are the real micro-conditioning ``(H, W, 0, 0, H, W)``;
    token ids are ``[BOS, random tokens..., EOS, PAD...]`` with a random length per row.
    """
    g = torch.Generator("cpu").manual_seed(seed)
    env = spec.env(batch, hw if spec.spatial else None)
    out: dict[str, torch.Tensor] = {}
    for t in spec.inputs:
        shape = t.shape(env)
        if t.name == "input_ids":
            vocab = int(spec.meta["vocab_size"])

            def token(key: str, fallback: int) -> int:
                v = spec.meta.get(key)
                return int(v) if v is not None and 0 <= int(v) < vocab else fallback

            # CLIP puts BOS/EOS at the top of the vocab; old SD 1.5 configs say bos=0, eos=2
            bos, eos = token("bos_token_id", vocab - 2), token("eos_token_id", vocab - 1)
            pad = token("pad_token_id", eos)
            L = shape[1]
            ids = torch.full(shape, pad, dtype=torch.int64)
            for row in range(shape[0]):
                n = int(torch.randint(1, L - 1, (1,), generator=g))
                ids[row, 0] = bos
                ids[row, 1:n + 1] = torch.randint(0, max(1, vocab - 2), (n,), generator=g)
                ids[row, n + 1] = eos
            out[t.name] = ids
        elif t.name == "timestep":
            out[t.name] = torch.rand(shape, generator=g) * 1000
        elif t.name == "time_ids":
            H, W = hw
            row = torch.tensor([H, W, 0, 0, H, W][: shape[1]], dtype=torch.float32)
            out[t.name] = row.expand(shape).clone()
        elif t.dtype in ("FP32", "FP16", "BF16", "FP64"):
            out[t.name] = torch.randn(shape, generator=g).to(t.torch_dtype)
        else:
            raise ValueError(f"no example rule for {spec.kind}.{t.name} ({t.dtype})")
    return out


def check_inputs(spec: NetworkSpec, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The symbol values ``inputs`` bind, after checking their shapes and dtypes against ``spec``."""
    env = spec.bind({k: tuple(v.shape) for k, v in inputs.items()})
    for t in spec.inputs:
        if inputs[t.name].dtype != t.torch_dtype:
            raise TypeError(f"{spec.kind}.{t.name}: dtype {inputs[t.name].dtype} != spec {t.dtype}")
    return env


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _forced_upsample_size(module: nn.Module) -> Iterator[None]:
    """Trace diffusers UNets with ``forward_upsample_size`` on, for any latent size."""
    saved = []
    for m in module.modules():
        if hasattr(m, "num_upsamplers") and hasattr(m, "up_blocks"):
            saved.append((m, m.num_upsamplers))
            # dim % 2**62 != 0 for every real size -> the explicit-size branch is taken
            m.num_upsamplers = 62
    try:
        yield
    finally:
        for m, n in saved:
            m.num_upsamplers = n


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block; every submodule's own training flag comes back after."""
    # restore each submodule's own flag: module.train(x) would set it on every child
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' expected warnings (legacy-exporter deprecation, tracer notes)."""
    # "torchvision is not installed. Skipping ...", "failed while executing int_truediv"
    loggers = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration",
                                              "torch.utils._sympy.interp")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _torch_export(module: nn.Module, spec: NetworkSpec, inputs: Mapping[str, torch.Tensor],
                  raw_path: Path, exporter: str, opset: int) -> None:
    if exporter == "torchscript":
        torch.onnx.export(
            module, tuple(inputs[n] for n in spec.input_names), str(raw_path),
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), opset_version=opset,
            do_constant_folding=False, dynamo=False,
        )
    else:
        torch.onnx.export(
            module, (), str(raw_path), kwargs={n: inputs[n] for n in spec.input_names},
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes(), opset_version=opset,
            dynamo=True, external_data=True, optimize=False, verbose=False,
        )


def _stamp_io(model, spec: NetworkSpec) -> None:
    """Check graph I/O against the spec and write the spec's dims into the graph."""
    init_names = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init_names]
    for role, actual, expected in (("input", graph_inputs, spec.inputs),
                                   ("output", list(model.graph.output), spec.outputs)):
        names = [v.name for v in actual]
        if names != [t.name for t in expected]:
            raise ValueError(f"{spec.kind}: ONNX {role}s {names} != spec {[t.name for t in expected]}")
        for vi, t in zip(actual, expected):
            tt = vi.type.tensor_type
            if tt.elem_type != t.onnx_dtype:
                raise ValueError(f"{spec.kind}.{t.name}: ONNX elem_type {tt.elem_type} != spec {t.dtype}")
            got = value_info_dims(vi)
            if len(got) != t.rank:
                raise ValueError(f"{spec.kind}.{t.name}: ONNX rank {len(got)} {got} != spec {t.dims}")
            for g, d in zip(got, t.dims):
                if isinstance(d, str) and isinstance(g, int):
                    raise ValueError(f"{spec.kind}.{t.name}: dynamic axis {d!r} was exported as the "
                                     f"constant {g} (ONNX dims {got}); was the example size 1?")
                if isinstance(d, int) and isinstance(g, int) and d != g:
                    raise ValueError(f"{spec.kind}.{t.name}: ONNX dims {got} != spec {t.dims}")
                if role == "input" and isinstance(d, int) and not isinstance(g, int):
                    raise ValueError(f"{spec.kind}.{t.name}: static axis {d} exported as dynamic ({got})")
            shape = tt.shape
            shape.ClearField("dim")
            for d in t.dims:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = d


def export_onnx(module: nn.Module, spec: NetworkSpec, example_inputs: Mapping[str, torch.Tensor],
                path: Path, *, opset: int | None = None, exporter: str = "torchscript") -> ExportResult:
    """Export ``module`` (a :mod:`craft_export.networks` wrapper) to ``path`` (``.../model.onnx``).

    Input/output names, dtypes and dims follow ``spec``; every symbolic axis of the spec
    is dynamic in the graph. ``example_inputs`` (by input name) must use size >= 2 on
    every dynamic axis. Weights go to ``<path>.data``. Nothing appears at ``path`` unless
    the whole export succeeded and passed ``onnx.checker``.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    opset = DEFAULT_OPSET[exporter] if opset is None else int(opset)
    path = Path(path)
    env = check_inputs(spec, example_inputs)
    small = {s: n for s, n in env.items() if n < 2}
    if small:
        raise ValueError(f"{spec.kind}: example sizes {small} < 2 would be baked into the graph; "
                         "export with batch >= 2 and latent sizes >= 2")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    t0 = time.perf_counter()
    try:
        raw_dir = staging / "raw"
        raw_dir.mkdir()
        raw_path = raw_dir / "model.onnx"
        with phase("trace"), _quiet(), eval_mode(module), _forced_upsample_size(module):
            _torch_export(module, spec, example_inputs, raw_path, exporter, opset)

        with phase("save"):
            model = onnx.load(str(raw_path), load_external_data=False)
            _stamp_io(model, spec)
            final = staging / path.name
            data_bytes = consolidate_external_data(model, raw_dir, final)
            shutil.rmtree(raw_dir)
            onnx.checker.check_model(str(final))  # by path: handles external data and > 2 GiB
            n_init = sum(1 for _ in iter_initializers(model.graph))
            n_nodes = len(model.graph.node)
            del model

        data_target = publish_onnx(final, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(path, data_target, exporter, opset, time.perf_counter() - t0,
                        n_init, n_nodes, data_bytes)
