"""Parity of an exported network with PyTorch: ONNX Runtime and the module on the same inputs.

The PyTorch outputs are computed first (:func:`reference_outputs`), then the ONNX Runtime session
is opened and compared with them (:func:`compare_outputs`): the exporter frees the module's
weights in between, so the network is held once at a time (PyTorch, then ONNX Runtime).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .onnx_export import check_inputs, eval_mode
from .ort import OrtSession
from .specs import NetworkSpec

__all__ = ["run_parity", "reference_outputs", "compare_outputs"]


def reference_outputs(module: nn.Module, spec: NetworkSpec,
                      inputs_list: Sequence[Mapping[str, torch.Tensor]]) -> list[tuple[np.ndarray, ...]]:
    """The module's outputs (fp32 numpy, in the spec's output order) on each input set."""
    refs = []
    with eval_mode(module):
        for inputs in inputs_list:
            check_inputs(spec, inputs)
            ref = module(**{n: inputs[n] for n in spec.input_names})
            ref = (ref,) if isinstance(ref, torch.Tensor) else tuple(ref)
            refs.append(tuple(r.detach().float().numpy() for r in ref))
    return refs


def compare_outputs(onnx_path: Path, spec: NetworkSpec, inputs_list: Sequence[Mapping[str, torch.Tensor]],
                    refs: Sequence[Sequence[np.ndarray]], *, providers: Sequence[str] = ("CPUExecutionProvider",),
                    threads: int | None = None) -> dict:
    """Run ONNX Runtime on each input set and compare with ``refs`` (:func:`reference_outputs`);
    the report of :func:`run_parity`. The session is closed when this returns."""
    sess = OrtSession(onnx_path, providers=providers, threads=threads or 0, arena=False)  # held for two runs
    ort_outputs = sess.output_names
    if ort_outputs != spec.output_names:
        raise ValueError(f"ONNX outputs {ort_outputs} != spec {spec.output_names}")
    abs_err = {n: 0.0 for n in spec.output_names}
    rel_err = {n: 0.0 for n in spec.output_names}
    cases = []
    for inputs, ref in zip(inputs_list, refs, strict=True):
        env = check_inputs(spec, inputs)
        got = sess({n: inputs[n].numpy() for n in spec.input_names})
        case = {"env": env, "max_abs_err": {}}
        for t, r, o in zip(spec.outputs, ref, (got[n] for n in spec.output_names)):
            expected = t.shape(env)
            if o.shape != r.shape or tuple(o.shape) != expected:
                raise ValueError(f"{spec.kind}.{t.name}: ONNX shape {o.shape}, torch {r.shape}, "
                                 f"spec {expected} at {env}")
            err = float(np.max(np.abs(o.astype(np.float64) - r))) if r.size else 0.0
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            case["max_abs_err"][t.name] = err
            abs_err[t.name] = max(abs_err[t.name], err)
            rel_err[t.name] = max(rel_err[t.name], err / scale if scale else err)
        cases.append(case)
    del sess
    return {"max_abs_err": abs_err, "max_rel_err": rel_err,
            "worst_abs_err": max(abs_err.values(), default=0.0), "cases": cases}


def run_parity(module: nn.Module, onnx_path: Path, spec: NetworkSpec,
               inputs_list: Sequence[Mapping[str, torch.Tensor]], *,
               providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None) -> dict:
    """Run ONNX Runtime and PyTorch on each input set; report the errors per output.

    Returns ``{"max_abs_err": {output: float}, "max_rel_err": {output: float},
    "worst_abs_err": float, "cases": [{"env": {...}, "max_abs_err": {...}}, ...]}``, where
    the relative error is max |ort - torch| / max |torch|. Raises if an output's shape
    differs from PyTorch's or from the spec's. ``threads``: ORT intra-op threads (default:
    ORT's choice).
    """
    refs = reference_outputs(module, spec, inputs_list)
    return compare_outputs(onnx_path, spec, inputs_list, refs, providers=providers, threads=threads)
