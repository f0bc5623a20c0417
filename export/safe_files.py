"""Files from outside the project read defensively: safetensors headers, asset copies, confined paths.

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, byte offsets; ``__metadata__`` -> strings) and the data. :func:`check_safetensors`
validates all of it from the header alone, before any tensor is read: a header length beyond the
file, offsets that overlap or run past the data, a declared shape whose size disagrees with its
bytes (so a gigantic shape is refused without allocating it), a dtype that no weight file uses.
Every refusal names the file, the tensor and the value.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["UnsafeFileError", "WEIGHT_DTYPES", "ITEMSIZE", "check_safetensors", "copy_tree_confined",
           "copy_file_confined", "check_confined", "link_root"]

#: Bytes per element of every safetensors dtype.
ITEMSIZE: Mapping[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: dtypes of weight tensors; integer dtypes are accepted for scalars only (an ``alpha`` saved as int).
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")
_SCALAR_INTS = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
MAX_TENSORS = 200_000
MAX_DIMS = 8


class UnsafeFileError(ValueError):
    """A file that is malformed or reaches outside where it may; the message names file and field."""


def _fail(path: Path, where: str, reason: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: {where}: {reason}")


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(header, header length, data length) of a safetensors file, the sizes checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, "header", f"file of {size} bytes is too short to be safetensors")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise _fail(path, "header", f"declared header length {n} is larger than the file ({size} bytes)")
        if n > MAX_HEADER:
            raise _fail(path, "header", f"declared header length {n} exceeds {MAX_HEADER} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, "header", f"not UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _fail(path, "header", f"must be a JSON object, got {type(header).__name__}")
    return header, n, size - 8 - n


def _check_metadata(path: Path, meta: Any) -> None:
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _fail(path, "__metadata__", "must map strings to strings")


def _check_entry(path: Path, name: str, entry: Any, data_len: int, dtypes: Sequence[str]) -> tuple[int, int]:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, where, f"entry must hold exactly dtype, shape, data_offsets, got {entry!r:.200}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEMSIZE:
        raise _fail(path, f"{where}.dtype", f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _fail(path, f"{where}.shape", f"must be at most {MAX_DIMS} non-negative integers, got {shape!r:.200}")
    count = math.prod(shape)  # Python ints: a gigantic shape cannot overflow, and nothing is allocated
    if dtype not in dtypes and not (dtype in _SCALAR_INTS and count <= 1):
        raise _fail(path, f"{where}.dtype", f"{dtype} is not a weight dtype ({', '.join(dtypes)})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise _fail(path, f"{where}.data_offsets", f"must be [begin, end] integers, got {offsets!r:.200}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _fail(path, f"{where}.data_offsets", f"{offsets} lies outside the data ({data_len} bytes)")
    if end - begin != count * ITEMSIZE[dtype]:
        raise _fail(path, f"{where}.shape", f"{shape} of {dtype} needs {count * ITEMSIZE[dtype]} bytes, "
                                           f"the offsets give {end - begin}")
    return begin, end


def check_safetensors(path: Path | str, dtypes: Sequence[str] = WEIGHT_DTYPES) -> dict[str, Any]:
    """Validate a safetensors file's header against its size; returns the header. Reads no tensor."""
    path = Path(path)
    header, _, data_len = _read_header(path)
    _check_metadata(path, header.pop("__metadata__", {}))
    if len(header) > MAX_TENSORS:
        raise _fail(path, "header", f"{len(header)} tensors (at most {MAX_TENSORS})")
    spans = sorted((_check_entry(path, name, entry, data_len, dtypes), name) for name, entry in header.items())
    for ((_, prev_end), prev), ((begin, _), name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise _fail(path, f"tensor {name!r}.data_offsets", f"overlaps tensor {prev!r} (begins at {begin}, "
                                                              f"{prev!r} ends at {prev_end})")
    return header


# -- copies into the repository ---------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def copy_file_confined(src: Path, dst: Path, root: Path) -> None:
    """Copy a regular file whose real path lies inside ``root`` (a symlink may not lead out of it)."""
    real, root = Path(src).resolve(), Path(root).resolve()
    if not _inside(real, root):
        raise UnsafeFileError(f"{src}: a symlink to {real}, outside {root}; copy the file itself there")
    if not real.is_file():
        raise UnsafeFileError(f"{src}: not a regular file")
    shutil.copyfile(real, dst)


def link_root(folder: Path) -> Path:
    """How far symlinks inside a model folder may lead: the folder itself, or for a Hugging Face cache
    snapshot (``models--org--name/snapshots/<rev>``, whose files link to ``../../blobs``) its ``models--`` folder."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def copy_tree_confined(src: Path, dst: Path, root: Path | None = None) -> None:
    """Copy a folder's regular files; a symlink may not lead outside ``root`` (default: ``src``)."""
    src = Path(src)
    root = Path(root or src).resolve()
    if not src.resolve().is_dir():
        raise UnsafeFileError(f"{src}: folder not found")
    seen = set()
    dst.mkdir(parents=True)
    for folder, dirs, files in os.walk(src, followlinks=True):
        here = Path(folder)
        real = here.resolve()
        if not _inside(real, root):
            raise UnsafeFileError(f"{here}: a symlink to {real}, outside {root}")
        if real in seen:  # a link back up the tree
            raise UnsafeFileError(f"{here}: a symlink loop ({real})")
        seen.add(real)
        out = dst / here.relative_to(src)
        out.mkdir(exist_ok=True)
        for name in files:
            copy_file_confined(here / name, out / name, root)


# -- recipe paths ---------------------------------------------------------------------------------------


def _files_of(path: Path) -> Iterable[Path]:
    yield path
    if path.is_dir():
        for folder, dirs, files in os.walk(path, followlinks=False):
            for name in (*dirs, *files):
                yield Path(folder) / name


def check_confined(paths: Iterable[tuple[str, Path]], roots: Sequence[Path]) -> None:
    """Every ``(field, path)`` - and, for a folder, every file and link in it - must resolve (``..`` and
    symlinks followed) inside one of ``roots``."""
    real_roots = [Path(r).resolve() for r in roots]
    for field_name, path in paths:
        for item in _files_of(Path(path)):
            real = item.resolve()
            if not any(_inside(real, r) for r in real_roots):
                shown = path if item == Path(path) else f"{path} (through {item})"
                raise UnsafeFileError(f"{field_name}: {shown} resolves to {real}, outside the allowed folders "
                                      f"{[str(r) for r in real_roots]} (--confine-to)")
