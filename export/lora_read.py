"""Reading LoRA files without torch: what ``craft export`` needs to register a runtime LoRA quickly.

:func:`read_lora_file` gives a safetensors LoRA's tensors (torch tensors, or numpy arrays with
``framework="np"``) and header metadata, after refusing pickles and checking the header against the
file (:func:`~craft_export.safe_files.check_safetensors`); NaN / Inf values are refused naming the
tensor. With numpy, BF16 tensors are widened to float32 (exact: bf16 is the top half of an fp32),
as numpy has no bfloat16. :func:`sha256_file` hashes any file. :mod:`.loading` re-exports all of it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .safe_files import UnsafeFileError, check_safetensors

__all__ = ["LoadError", "read_lora_file", "sha256_file", "require"]

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
FRAMEWORKS = ("pt", "np")
_NUMPY_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8",
                 "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}


class LoadError(ValueError):
    """A file or folder that cannot be used, with its path in the message."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise LoadError(f"{what} not found: {path}")
    return path


def _numpy_tensors(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of a safetensors file whose header :func:`check_safetensors` accepted, as numpy arrays."""
    import numpy as np

    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    out = {}
    for name, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype == "BF16":
            bits = np.frombuffer(raw, "<u2", (end - begin) // 2, start + begin)
            out[name] = (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        elif dtype in _NUMPY_DTYPES:
            np_dtype = np.dtype(_NUMPY_DTYPES[dtype])
            out[name] = np.frombuffer(raw, np_dtype, (end - begin) // np_dtype.itemsize, start + begin).reshape(shape)
        else:  # F8: never a weight dtype (check_safetensors refused it already)
            raise LoadError(f"{path}: tensor {name!r}: dtype {dtype} cannot be read without torch")
    return out


def read_lora_file(path: Path, framework: str = "pt") -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors (``framework``: ``pt`` torch, ``np`` numpy) and header metadata of a safetensors LoRA;
    pickles and broken files are refused."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoadError(f"{path}: pickle checkpoints ({path.suffix}) are refused; convert the LoRA to .safetensors")
    require(path, "LoRA file")
    if not path.is_file():
        raise LoadError(f"LoRA path is not a file: {path}")
    if path.suffix.lower() != ".safetensors":
        raise LoadError(f"{path}: only .safetensors LoRA files are accepted")
    try:
        header = check_safetensors(path)  # the header against the file size, before any tensor is read
    except UnsafeFileError as exc:
        raise LoadError(f"not a readable safetensors file: {exc}") from exc
    if framework == "np":
        import numpy as np

        try:
            tensors = _numpy_tensors(path, header)
            metadata = dict(_metadata(path))
        except (OSError, ValueError) as exc:
            raise LoadError(f"{path}: not a readable safetensors file ({exc})") from exc
        bad = [k for k, t in tensors.items() if t.dtype.kind == "f" and not np.isfinite(t).all()]
    else:
        import torch
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise LoadError(f"{path}: not a readable safetensors file ({exc})") from exc
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise LoadError(f"{path}: tensor {bad[0]!r} holds NaN or Inf values")
    return tensors, metadata


def _metadata(path: Path) -> dict[str, str]:
    """The header's ``__metadata__`` (checked to map strings to strings by :func:`check_safetensors`)."""
    import json

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__", {})
