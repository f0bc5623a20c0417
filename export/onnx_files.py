"""ONNX files on disk: one external-data file per model, atomic publication, reading graphs back.

Layout: ``model.onnx`` (graph) + ``model.onnx.data`` (every initializer of 1 KiB or more, one
file). External data is always used, so models over protobuf's 2 GiB limit (the SDXL UNet)
take the same path as the tiny test models. Tensors are copied one at a time, never all in
memory. A published model's ``.data`` is moved into place first and its graph last, so no
half-written model is ever visible.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Mapping
from pathlib import Path

from .specs import NetworkSpec, TensorSpec

__all__ = ["EXTERNAL_THRESHOLD", "MappedWeights", "consolidate_external_data", "publish_onnx", "onnx_io",
           "check_onnx_contract",
           "onnx_initializer_hashes", "iter_initializers", "value_info_dims"]

EXTERNAL_THRESHOLD = 1024  # bytes; smaller tensors stay inline in model.onnx
_ALIGN = 64
# ONNX TensorProto data types -> torch dtype names (:class:`MappedWeights`)
_TORCH_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 6: "int32", 7: "int64"}


def value_info_dims(vi) -> tuple:
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def iter_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from iter_initializers(attr.g)
            for g in attr.graphs:
                yield from iter_initializers(g)


def _external_info(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _tensor_bytes(tensor, base_dir: Path) -> bytes:
    """Raw little-endian bytes of an initializer, wherever they are stored."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = _external_info(tensor)
        with open(base_dir / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            length = info.get("length")
            return f.read(int(length)) if length is not None else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def consolidate_external_data(model, src_dir: Path, dst_model: Path,
                              threshold: int = EXTERNAL_THRESHOLD, replace: Mapping[str, object] | None = None) -> int:
    """Write ``model`` as ``dst_model`` + ``dst_model.data``: every initializer >= ``threshold``
    bytes goes to the one data file, read one tensor at a time from wherever it is now
    (inline, or external files under ``src_dir``; the TorchScript exporter writes one file
    per tensor past 2 GiB). ``model`` (loaded with ``load_external_data=False``) is
    modified in place. ``replace``: initializer name -> new value (a C-contiguous numpy
    array of the initializer's dtype and shape, checked by the caller), written in place of
    the old bytes straight from the array (no copy in the graph). Returns the data file's size.
    """
    import onnx

    replace = replace or {}
    data_name = dst_model.name + ".data"
    with open(dst_model.parent / data_name, "wb") as out:
        for tensor in iter_initializers(model.graph):
            if tensor.name in replace:
                blob = memoryview(replace[tensor.name]).cast("B")
                _clear_data(tensor)
                if len(blob) < threshold:  # small: inline, as any small initializer
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    tensor.raw_data = blob.tobytes()
                    continue
                _append_external(tensor, out, blob, data_name)
                continue
            external = tensor.data_location == onnx.TensorProto.EXTERNAL
            if tensor.data_type == onnx.TensorProto.STRING:
                continue  # no raw byte layout; never large in these graphs
            size = int(_external_info(tensor).get("length", -1)) if external else tensor.ByteSize()
            if not external and size < threshold:
                continue
            blob = _tensor_bytes(tensor, src_dir)
            if not external and len(blob) < threshold:
                continue
            _clear_data(tensor)
            _append_external(tensor, out, blob, data_name)
        out.flush()
        os.fsync(out.fileno())
        data_bytes = out.tell()
    with open(dst_model, "wb") as f:
        f.write(model.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    return data_bytes


def _clear_data(tensor) -> None:
    for fld in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(fld)
    del tensor.external_data[:]


def _append_external(tensor, out, blob, data_name: str) -> None:
    """Append ``blob`` to the open data file (aligned) and point ``tensor`` at it."""
    import onnx

    pad = -out.tell() % _ALIGN
    if pad:
        out.write(b"\0" * pad)
    offset = out.tell()
    out.write(blob)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
        e = tensor.external_data.add()
        e.key, e.value = k, v


def publish_onnx(final: Path, path: Path) -> Path:
    """Move ``final`` (+ ``final.data``) to ``path``: the old graph goes first so it never points
    at new weights, then the data, then the graph. Returns the data file's path."""
    data_target = path.with_name(path.name + ".data")
    if path.exists():
        path.unlink()
    os.replace(final.with_name(final.name + ".data"), data_target)
    os.replace(final, path)
    _fsync_dir(path.parent)
    return data_target


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def onnx_io(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Graph inputs and outputs of an ONNX file as TensorSpecs (dims: int or dim_param).

    Raises if an axis has neither a value nor a name.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init_names = {i.name for i in model.graph.initializer}

    def conv(vi) -> TensorSpec:
        dims = value_info_dims(vi)
        if any(d is None for d in dims):
            raise ValueError(f"{path}: {vi.name} has an unnamed dynamic axis: {dims}")
        return TensorSpec(vi.name, TensorSpec.from_onnx_dtype(vi.type.tensor_type.elem_type), dims)

    return (tuple(conv(v) for v in model.graph.input if v.name not in init_names),
            tuple(conv(v) for v in model.graph.output))


def check_onnx_contract(path: Path, spec: NetworkSpec) -> None:
    """Raise unless the ONNX graph's inputs/outputs are exactly ``spec``'s (names, dtypes, dims)."""
    inputs, outputs = onnx_io(path)
    if inputs != spec.inputs or outputs != spec.outputs:
        raise ValueError(f"{path}: graph I/O\n  {inputs}\n  {outputs}\n"
                         f"!= spec {spec.kind}\n  {spec.inputs}\n  {spec.outputs}")


def onnx_initializer_hashes(path: Path) -> dict[str, str]:
    """Initializer name -> sha256 of (dtype, dims, raw bytes), read one tensor at a time."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, str] = {}
    for tensor in iter_initializers(model.graph):
        h = hashlib.sha256(f"{tensor.data_type}:{tuple(tensor.dims)}:".encode())
        h.update(_tensor_bytes(tensor, path.parent))
        out[tensor.name] = h.hexdigest()
    return out


class MappedWeights:
    """The external-data initializers of an ONNX file as torch tensors over a private mapping of its data file.

    The exporter points a network's parameters at the weights it has just exported (byte-equal,
    checked): their memory is then the page cache of the file, which :meth:`release` drops from
    this process (``MADV_DONTNEED``; the next read faults the pages back in from the file) while
    ONNX Runtime holds its own copy during a parity check. ``tensors``: name -> tensor (read-only in
    practice: a write would stay private to this process and be dropped by :meth:`release`).
    """

    def __init__(self, path: Path):
        import onnx
        import torch

        path = Path(path)
        model = onnx.load(str(path), load_external_data=False)
        self._maps: dict[str, mmap.mmap | None] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING:
                continue
            info = _external_info(tensor)
            dtype = _TORCH_DTYPES.get(tensor.data_type)
            if dtype is None:
                continue  # not a type the networks' parameters have: left out
            dtype = getattr(torch, dtype)
            buffer = self._map(path.parent / info["location"])
            if buffer is None:
                continue
            offset, count = int(info.get("offset", 0)), 1
            for d in tensor.dims:
                count *= int(d)
            if offset % dtype.itemsize or offset + count * dtype.itemsize > len(buffer):
                continue
            if not count:
                continue
            flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
            self.tensors[tensor.name] = flat.view(tuple(int(d) for d in tensor.dims))

    def _map(self, file: Path) -> mmap.mmap | None:
        key = str(file)
        if key not in self._maps:
            with open(file, "rb") as f:  # the mapping outlives the descriptor (and a rename or unlink of the file)
                size = os.fstat(f.fileno()).st_size
                self._maps[key] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        return self._maps[key]

    def release(self) -> None:
        """Drop the mapped pages from this process's resident memory; the tensors stay valid."""
        for m in self._maps.values():
            if m is not None:
                m.madvise(mmap.MADV_DONTNEED)
