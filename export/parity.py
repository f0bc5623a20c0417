"""Parity of an exported network with PyTorch: ONNX Runtime and the module on the same inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .onnx_export import check_inputs, eval_mode
from .ort import OrtSession
from .specs import NetworkSpec

__all__ = ["run_parity"]


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
    sess = OrtSession(onnx_path, providers=providers, threads=threads or 0)
    ort_outputs = sess.output_names
    if ort_outputs != spec.output_names:
        raise ValueError(f"ONNX outputs {ort_outputs} != spec {spec.output_names}")
    abs_err = {n: 0.0 for n in spec.output_names}
    rel_err = {n: 0.0 for n in spec.output_names}
    cases = []
    with eval_mode(module):
        for inputs in inputs_list:
            env = check_inputs(spec, inputs)
            ref = module(**{n: inputs[n] for n in spec.input_names})
            ref = (ref,) if isinstance(ref, torch.Tensor) else tuple(ref)
            got = sess({n: inputs[n].numpy() for n in spec.input_names})
            case = {"env": env, "max_abs_err": {}}
            for t, r, o in zip(spec.outputs, ref, (got[n] for n in spec.output_names)):
                r = r.detach().float().numpy()
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
    return {"max_abs_err": abs_err, "max_rel_err": rel_err,
            "worst_abs_err": max(abs_err.values(), default=0.0), "cases": cases}
