"""ONNX Runtime sessions: the one place an ``InferenceSession`` is built.

The export's parity check, the TensorRT engine check and the Python-backend runners of the
served repository all open their sessions here, with the same options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ort_session", "OrtSession"]

CPU = ("CPUExecutionProvider",)


def ort_session(path: Path | bytes, *, providers: Sequence[str] | None = None, threads: int | None = None,
                initializers: Mapping[str, Any] | None = None, arena: bool = True,
                external: Mapping[str, Any] | None = None, folder: Path | None = None):
    """An ``onnxruntime.InferenceSession`` over ``path`` (``model.onnx``, external data beside it; or a
    serialized graph, its external data in ``folder``).

    ``threads``: intra-op threads (None or 0: ONNX Runtime's choice). ``providers``: default CPU.
    ``initializers``: name -> ``OrtValue`` used instead of the graph's own (``SessionOptions.add_initializer``:
    ONNX Runtime does not read those from the file, and sessions given the same OrtValue share its memory;
    the caller keeps the values alive as long as the session). Only for weights equal to the file's:
    with graph optimizations on, ONNX Runtime folds constants (a linear weight's Transpose, a conv's
    layout) from the file's values and the given value is not what runs.
    ``external``: name -> ``OrtValue`` for initializers kept in external data files
    (``SessionOptions.add_external_initializers``): read instead of the file before the graph is
    optimized, so these may differ from the file's (a LoRA merged in memory).
    ``arena=False``: no CPU memory arena, each intermediate tensor is allocated and freed as it
    lives (the arena grows by doubling and keeps its peak; a short-lived check session needs
    only what is alive at once). Same kernels, same results.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not arena:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False  # no block planned for a repeat of the same shapes either
    if threads:
        options.intra_op_num_threads = int(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle pool threads sleep instead of spinning: sessions share few cores with each other (one per
    # Triton model) and with PyTorch (the parity check alternates ONNX Runtime and PyTorch runs).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    if external:
        options.add_external_initializers(list(external), list(external.values()))
    if isinstance(path, (bytes, bytearray)):  # a serialized graph: its external data paths are relative to ``folder``
        model = bytes(path)
        if folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    else:
        model = str(path)
    return ort.InferenceSession(model, options, providers=list(providers or CPU))


class OrtSession:
    """A network as a callable: ``session({input: array}) -> {output: array}`` in the graph's own ranks.

    :class:`~craft_export.trt_session.TrtSession` has the same interface.
    """

    def __init__(self, path: Path | bytes, *, threads: int = 0, providers: Sequence[str] | None = None,
                 initializers: Mapping[str, Any] | None = None, arena: bool = True,
                 external: Mapping[str, Any] | None = None, folder: Path | None = None):
        self.session = ort_session(path, providers=providers, threads=threads, initializers=initializers,
                                   arena=arena, external=external, folder=folder)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: inputs[name] for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def run_torch(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """TrtSession's torch interface: CPU torch tensors in and out."""
        import torch

        out = self({name: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
                    for name, value in inputs.items()})
        return {name: torch.from_numpy(array) for name, array in out.items()}
