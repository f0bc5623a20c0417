"""UNet weight variants as ONNX files derived from the W_init graph: same graph, new weights.

A baked variant (Eq. 8) differs from W_init only in the weights of the routed modules, so
instead of tracing and exporting the whole network again, the W_init ONNX file is copied
with those initializers replaced - the ONNX counterpart of a TensorRT refit. The exporter
still runs the parity check on the result against the baked PyTorch module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = ["VariantExportError", "derive_variant"]


class VariantExportError(RuntimeError):
    """The base graph does not hold a weight under the expected initializer name."""


def derive_variant(base: Path, overrides: Mapping[str, torch.Tensor], path: Path, *, size_threshold: int = 1024) -> int:
    """Write ``path`` (+ ``path.data``): the graph of ``base`` with ``overrides`` (initializer name -> tensor).

    Returns the number of replaced initializers. Written in a temp folder and renamed.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(base), load_external_data=True)
    by_name = {init.name: init for init in model.graph.initializer}
    missing = sorted(set(overrides) - set(by_name))
    if missing:
        raise VariantExportError(f"{base}: no initializer named {missing[0]!r} (and {len(missing) - 1} more)")
    for name, value in overrides.items():
        old = by_name[name]
        array = value.detach().cpu().numpy().astype(helper.tensor_dtype_to_np_dtype(old.data_type), copy=False)
        if tuple(old.dims) != array.shape:
            raise VariantExportError(f"{base}: initializer {name!r} has shape {tuple(old.dims)}, new weight {array.shape}")
        old.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = staging / path.name
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=size_threshold)
        os.replace(staging / f"{path.name}.data", path.with_name(f"{path.name}.data"))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return len(overrides)
