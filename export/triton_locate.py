"""Where ``tritonserver`` is, and which native backends it has.

Binaries are looked up in this order: ``$TRITONSERVER_BIN``, the NGC container's
``/opt/tritonserver/bin/tritonserver``, then the one bundled in the ``nvidia-pytriton``
wheel (``site-packages/pytriton/tritonserver``). ``craft export`` asks this to pick its engine
runners (native backends or Python-backend runners); ``craft_serving.triton_server`` launches
what it finds.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

__all__ = ["TritonServerError", "find_tritonserver", "bundled_tritonserver", "pytriton_dist", "is_bundled",
           "has_native_backend", "ENV_TRITONSERVER_BIN", "SYSTEM_TRITONSERVER"]

ENV_TRITONSERVER_BIN = "TRITONSERVER_BIN"
SYSTEM_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")


class TritonServerError(RuntimeError):
    """tritonserver could not be found, prepared, started, or did not become ready."""


@functools.cache
def pytriton_dist() -> Path | None:
    """``site-packages/pytriton/tritonserver`` of the installed wheel, without importing it."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def bundled_tritonserver() -> Path | None:
    """The ``tritonserver`` binary bundled in ``nvidia-pytriton``, or None if not installed."""
    dist = pytriton_dist()
    binary = dist / "bin" / "tritonserver" if dist is not None else None
    return binary if binary is not None and binary.is_file() else None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_tritonserver() -> Path:
    """Locate tritonserver: ``$TRITONSERVER_BIN``, ``/opt/tritonserver``, then pytriton's.

    A set but unusable ``$TRITONSERVER_BIN`` is an error rather than silently skipped.
    """
    explicit = os.environ.get(ENV_TRITONSERVER_BIN)
    if explicit:
        path = Path(explicit).expanduser()
        if not _is_executable(path):
            raise TritonServerError(f"${ENV_TRITONSERVER_BIN}={explicit} is not an executable file")
        return path.resolve()
    tried = [f"${ENV_TRITONSERVER_BIN} (unset)", str(SYSTEM_TRITONSERVER)]
    if _is_executable(SYSTEM_TRITONSERVER):
        return SYSTEM_TRITONSERVER
    bundled = bundled_tritonserver()
    dist = pytriton_dist()
    tried.append(str(dist / "bin" / "tritonserver") if dist else "pytriton (not installed)")
    if bundled is not None and _is_executable(bundled):
        return bundled.resolve()
    raise TritonServerError(
        "tritonserver not found; tried: "
        + ", ".join(tried)
        + ". Install the 'serve' extra (pip install -e '.[serve]') or set "
        + ENV_TRITONSERVER_BIN
    )


def is_bundled(binary: Path) -> bool:
    """Whether ``binary`` is the one bundled in ``nvidia-pytriton``."""
    dist = pytriton_dist()
    return dist is not None and binary.resolve().is_relative_to(dist.resolve())


def has_native_backend(binary: Path, backend: str) -> bool:
    """Whether the server of ``binary`` ships the native ``backend`` (``onnxruntime``, ``tensorrt``).

    The NGC container has them; pytriton's bundled server has only the Python backend.
    """
    return (Path(binary).parent.parent / "backends" / backend).is_dir()
