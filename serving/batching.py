"""Batching for the Python-backend engine runners (machines without native ORT/TensorRT backends).

Triton hands a Python model a list of requests (several when dynamic batching gathers
them); :func:`run_batched` concatenates the requests whose non-batch shapes agree, runs
the session once per group, and splits the outputs back per request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["run_batched"]

Batch = Mapping[str, np.ndarray]


def _shape_key(inputs: Batch) -> tuple:
    # the device too (numpy arrays: "cpu"): tensors on different devices never meet in one concat
    return tuple(sorted((k, str(v.dtype), tuple(v.shape[1:]), str(getattr(v, "device", "cpu")))
                        for k, v in inputs.items()))


def run_batched(run: Callable[[Batch], dict[str, Any]], requests: Sequence[Batch], max_batch: int, *,
                concat: Callable[[list[Any]], Any] = np.concatenate, device: Any = None) -> list[dict[str, Any]]:
    """Run requests in as few calls as their shapes and ``max_batch`` allow; outputs in request order.

    Requests whose non-batch shapes, dtypes and devices agree are concatenated along the batch
    axis (up to ``max_batch`` items) and run once; each gets back views of the batched outputs.
    Works on numpy arrays, or torch tensors with ``concat=torch.cat``; ``device`` (torch tensors)
    moves every input there first, so requests that arrived on different devices (Triton's Python
    backend hands over CPU or GPU tensors as it likes) still batch together.
    """
    if device is not None:
        requests = [{k: v.to(device) for k, v in req.items()} for req in requests]
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
