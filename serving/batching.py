"""Engine runners for Python-backend Triton models (machines without native ORT/TensorRT backends).

Triton hands a Python model a list of requests (several when dynamic batching gathers
them); :func:`run_batched` concatenates the requests whose non-batch shapes agree, runs
the session once per group, and splits the outputs back per request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OrtSession", "run_batched"]

Batch = Mapping[str, np.ndarray]


class OrtSession:
    """An ONNX Runtime session over ``model.onnx`` (external data beside it)."""

    def __init__(self, path: Path, *, threads: int = 0, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # many sessions share few cores (one per Triton model): idle pool threads must sleep, not spin
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _rank(self, name: str, array: np.ndarray) -> np.ndarray:
        return _squeeze_to(array, self.input_ranks[name])

    def __call__(self, inputs: Batch) -> dict[str, np.ndarray]:
        feeds = {name: self._rank(name, inputs[name]) for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def run_torch(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """:class:`~craft_export.trt_session.TrtSession`'s torch interface: CPU torch tensors in and out."""
        import torch

        out = self({name: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
                    for name, value in inputs.items()})
        return {name: torch.from_numpy(array) for name, array in out.items()}


def _squeeze_to(array: np.ndarray, rank: int) -> np.ndarray:
    """Triton's per-item scalars arrive as (B, 1) where the graph takes (B,)."""
    while array.ndim > rank and array.shape[-1] == 1:
        array = array.reshape(array.shape[:-1])
    return array


def _shape_key(inputs: Batch) -> tuple:
    return tuple(sorted((k, str(v.dtype), tuple(v.shape[1:])) for k, v in inputs.items()))


def run_batched(run: Callable[[Batch], dict[str, Any]], requests: Sequence[Batch], max_batch: int, *,
                concat: Callable[[list[Any]], Any] = np.concatenate) -> list[dict[str, Any]]:
    """Run requests in as few calls as their shapes and ``max_batch`` allow; outputs in request order.

    Requests whose non-batch shapes and dtypes agree are concatenated along the batch axis (up to
    ``max_batch`` items) and run once; each gets back views of the batched outputs. Works on numpy
    arrays, or torch tensors with ``concat=torch.cat``.
    """
    results: list[dict[str, Any] | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(_shape_key(req), []).append(i)
    for indices in groups.values():
        chunk: list[int] = []
        size = 0
        for i in indices:
            n = _batch_size(requests[i])
            if chunk and size + n > max_batch:
                _run_chunk(run, requests, chunk, results, concat)
                chunk, size = [], 0
            chunk.append(i)
            size += n
        if chunk:
            _run_chunk(run, requests, chunk, results, concat)
    return results  # type: ignore[return-value]


def _batch_size(inputs: Batch) -> int:
    return next(iter(inputs.values())).shape[0]


def _run_chunk(run, requests, chunk, results, concat) -> None:
    if len(chunk) == 1:
        results[chunk[0]] = run(requests[chunk[0]])
        return
    names = list(requests[chunk[0]])
    merged = {n: concat([requests[j][n] for j in chunk]) for n in names}
    out = run(merged)
    offset = 0
    for j in chunk:
        size = _batch_size(requests[j])
        results[j] = {k: v[offset: offset + size] for k, v in out.items()}
        offset += size
