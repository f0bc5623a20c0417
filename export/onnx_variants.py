"""UNet weight variants as ONNX files derived from the W_init graph: same graph, new weights.

A baked variant (Eq. 8) differs from W_init only in the weights of the routed modules, so
instead of tracing and exporting the whole network again, the W_init ONNX file is copied
with those initializers replaced - the ONNX counterpart of a TensorRT refit. The exporter
still runs the parity check on the result against the baked PyTorch module.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = ["VariantExportError", "derive_variant"]


class VariantExportError(RuntimeError):
    """The base graph does not hold a weight under the expected initializer name."""


def derive_variant(base: Path, overrides: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write ``path`` (+ ``path.data``): the graph of ``base`` with ``overrides`` (initializer name -> tensor).

    The base's weights are copied one tensor at a time (never all in memory), the new ones
    written straight from their tensors (no copy in the graph); written in a temp folder and
    moved into place.
    """
    import onnx
    from onnx import helper

    from .onnx_files import consolidate_external_data, publish_onnx

    base = Path(base)
    model = onnx.load(str(base), load_external_data=False)
    by_name = {init.name: init for init in model.graph.initializer}
    missing = sorted(set(overrides) - set(by_name))
    if missing:
        raise VariantExportError(f"{base}: no initializer named {missing[0]!r} (and {len(missing) - 1} more)")
    arrays = {}
    for name, value in overrides.items():
        old = by_name[name]
        array = value.detach().cpu().numpy().astype(helper.tensor_dtype_to_np_dtype(old.data_type), copy=False)
        if tuple(old.dims) != array.shape:
            raise VariantExportError(f"{base}: initializer {name!r} has shape {tuple(old.dims)}, new weight {array.shape}")
        arrays[name] = np.ascontiguousarray(array)  # a view of the tensor when it already is one
    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        consolidate_external_data(model, base.parent, staging / path.name, replace=arrays)
        publish_onnx(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
