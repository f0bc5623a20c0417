"""The wire contract of ``craft_pipeline``: model names, request inputs, and the one dtype table.

Pure data with no imports, so the client never depends on server code while the server stages
(export: ONNX / TensorRT / ``config.pbtxt``; serving: request parsing, TensorRT sessions) read
the same table instead of keeping their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DType", "DTYPES", "REQUEST_INPUTS", "RESPONSE_OUTPUTS", "STREAM_OUTPUTS", "PIPELINE_MODEL", "STREAM_MODEL",
           "CATALOG_MODEL"]

PIPELINE_MODEL = "craft_pipeline"
STREAM_MODEL = "craft_pipeline_stream"
CATALOG_MODEL = "craft_catalog"


@dataclass(frozen=True)
class DType:
    """One Triton data type and its name in every library that handles tensors here."""

    name: str  # Triton wire name, as the clients send it: "FP32", "BYTES", ...
    numpy: str | None  # numpy dtype name (None: numpy has no such dtype, e.g. bfloat16)
    torch: str | None  # torch dtype name (None: torch has no such dtype, e.g. BYTES)
    onnx: int  # onnx.TensorProto element type (values fixed by onnx.proto, so onnx isn't imported)
    tensorrt: str | None  # tensorrt.DataType member (None: TensorRT has no such type)

    @property
    def config(self) -> str:
        """The name ``config.pbtxt`` uses (``data_type: TYPE_FP32``; BYTES is ``TYPE_STRING``)."""
        return "TYPE_STRING" if self.name == "BYTES" else f"TYPE_{self.name}"


DTYPES: Mapping[str, DType] = {d.name: d for d in (
    DType("FP32", "float32", "float32", 1, "FLOAT"),
    DType("UINT8", "uint8", "uint8", 2, "UINT8"),
    DType("INT8", "int8", "int8", 3, "INT8"),
    DType("INT16", "int16", "int16", 5, None),
    DType("INT32", "int32", "int32", 6, "INT32"),
    DType("INT64", "int64", "int64", 7, "INT64"),
    DType("BYTES", "object", None, 8, None),
    DType("BOOL", "bool", "bool", 9, "BOOL"),
    DType("FP16", "float16", "float16", 10, "HALF"),
    DType("FP64", "float64", "float64", 11, None),
    DType("BF16", None, "bfloat16", 16, "BF16"),
)}

# name -> (wire dtype, dims, required)
REQUEST_INPUTS: Mapping[str, tuple[str, list[int], bool]] = {
    "prompt": ("BYTES", [-1], True),
    "negative_prompt": ("BYTES", [1], False),
    "content": ("BYTES", [1], False),
    "style": ("BYTES", [1], False),
    "seed": ("INT64", [1], False),
    "steps": ("INT32", [1], False),
    "guidance": ("FP32", [1], False),
    "height": ("INT32", [1], False),
    "width": ("INT32", [1], False),
    "gamma_c": ("FP32", [1], False),
    "gamma_s": ("FP32", [1], False),
    "mode": ("BYTES", [1], False),
    "scheduler": ("BYTES", [1], False),
    "content_window": ("FP32", [2], False),
    "style_window": ("FP32", [2], False),
    "preview_every": ("INT32", [1], False),
}

# name -> (wire dtype, dims) of every response; the streaming model adds STREAM_OUTPUTS to its
# progress messages. "manifest": the id (sha256 hex of manifest.json) of the manifest the request
# was served under; the streaming model sends it in every message.
RESPONSE_OUTPUTS: Mapping[str, tuple[str, list[int]]] = {
    "image": ("UINT8", [-1, -1, -1, 3]),
    "notes": ("BYTES", [-1]),
    "manifest": ("BYTES", [1]),
}
STREAM_OUTPUTS: Mapping[str, tuple[str, list[int]]] = {
    "step": ("INT32", [1]),
    "total_steps": ("INT32", [1]),
    "preview": ("UINT8", [-1, -1, -1, 3]),
}
