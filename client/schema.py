"""The request/response schema of ``craft_pipeline``: one table shared by server and client."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["REQUEST_INPUTS", "NUMPY_DTYPES", "PIPELINE_MODEL", "STREAM_MODEL", "CATALOG_MODEL"]

PIPELINE_MODEL = "craft_pipeline"
STREAM_MODEL = "craft_pipeline_stream"
CATALOG_MODEL = "craft_catalog"

# name -> (Triton dtype, dims, required)
REQUEST_INPUTS: Mapping[str, tuple[str, list[int], bool]] = {
    "prompt": ("TYPE_STRING", [-1], True),
    "negative_prompt": ("TYPE_STRING", [1], False),
    "content": ("TYPE_STRING", [1], False),
    "style": ("TYPE_STRING", [1], False),
    "seed": ("TYPE_INT64", [1], False),
    "steps": ("TYPE_INT32", [1], False),
    "guidance": ("TYPE_FP32", [1], False),
    "height": ("TYPE_INT32", [1], False),
    "width": ("TYPE_INT32", [1], False),
    "gamma_c": ("TYPE_FP32", [1], False),
    "gamma_s": ("TYPE_FP32", [1], False),
    "mode": ("TYPE_STRING", [1], False),
    "scheduler": ("TYPE_STRING", [1], False),
    "content_window": ("TYPE_FP32", [2], False),
    "style_window": ("TYPE_FP32", [2], False),
    "preview_every": ("TYPE_INT32", [1], False),
}

# Triton dtype -> (numpy dtype name, client wire name)
NUMPY_DTYPES: Mapping[str, tuple[str, str]] = {
    "TYPE_STRING": ("object", "BYTES"),
    "TYPE_INT64": ("int64", "INT64"),
    "TYPE_INT32": ("int32", "INT32"),
    "TYPE_FP32": ("float32", "FP32"),
}
