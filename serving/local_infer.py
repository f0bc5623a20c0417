"""A repository's networks run in this process, as the Python runners of ``craft serve`` run them.

:class:`LocalInfer` is an ``infer_many`` for :class:`~.runtime.PipelineRuntime` without Triton: the
text encoders and the VAE decoder are ONNX Runtime sessions on the exported files, and the
repository's one ``unet`` model is the runner the ``unet`` Triton model holds
(:class:`~.unet_weights.UNetWeights`: baked sessions and the runtime-LoRA network, rows picked by
their selectors as :class:`~.unet_model.UNetModel` picks them). Calls run one after another. Used by
benchmarks and tests that want the served code path minus the server (gRPC, stub processes, queues).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from craft_export.ort import OrtSession

from .manifest import inside, read_manifest
from .runtime import NetCall
from .unet_weights import UNetWeights, split_selectors

__all__ = ["LocalInfer"]

class LocalInfer:
    """``infer_many(calls) -> [outputs]`` over a repository's files; see the module docstring.

    ``threads``: ONNX Runtime intra-op threads of every session (0: its choice); ``unet_options``:
    keyword arguments of the ``unet`` model's :class:`~.unet_weights.UNetWeights` (its config parameters).
    ``unet_rows`` counts the batch size of every call to the ``unet`` model and ``unet_seconds`` their
    time (benchmarks).
    """

    def __init__(self, root: Path, *, threads: int = 0, **unet_options):
        self.root = Path(root)
        self.threads = threads
        self.view = read_manifest(self.root)
        if not self.view.unet_model:
            raise ValueError(f"{self.root}: no one-model UNet (export with --runner python and ONNX Runtime)")
        self.unet = UNetWeights(self.root, threads=threads, **unet_options)
        self.sessions: dict[str, OrtSession] = {}
        self.unet_rows: list[int] = []
        self.unet_seconds = 0.0

    def _session(self, model: str) -> OrtSession:
        if model not in self.sessions:
            self.sessions[model] = OrtSession(inside(self.root, model) / "1" / "model.onnx", threads=self.threads)
        return self.sessions[model]

    def _unet(self, inputs) -> torch.Tensor:
        variants, feed = split_selectors(inputs)
        t0 = time.perf_counter()
        out = self.unet(feed, variants)
        self.unet_seconds += time.perf_counter() - t0
        self.unet_rows.append(len(variants))
        return out

    def __call__(self, calls: Sequence[NetCall]) -> list[dict[str, torch.Tensor]]:
        outs = []
        for call in calls:
            if call.model == self.view.unet_model:
                outs.append({"noise_pred": self._unet(call.inputs)})
                continue
            feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in call.inputs.items()}
            result = self._session(call.model)(feeds)
            outs.append({n: torch.from_numpy(np.ascontiguousarray(result[n])) for n in call.outputs})
        return outs
