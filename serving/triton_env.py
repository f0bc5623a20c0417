"""What pytriton's bundled ``tritonserver`` needs to run Python-backend models from this venv.

* A backends directory whose ``python/`` folder holds the Python-backend stub built for
  the running interpreter (the wheel ships one stub per Python version). :func:`backend_dir`
  assembles it once under ``$CRAFT_CACHE_DIR`` (default ``~/.cache/craft``) and renames
  it into place atomically; the wheel itself is never modified.
* The environment from :func:`server_env`: this interpreter's ``bin/`` first on ``PATH``
  (the stub's embedded, *isolated* CPython ignores ``PYTHONPATH`` and finds its prefix
  by looking up ``python3`` on ``PATH``; the venv's ``pyvenv.cfg`` then gives it the
  venv's site-packages with ``.pth`` files processed, so editable installs such as
  ``craft_serving`` -> ``serving/`` import normally in ``model.py``), and ``LD_LIBRARY_PATH``
  with the interpreter's ``LIBDIR`` (matching ``libpython``) and pytriton's bundled libs.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from craft_export.triton_locate import TritonServerError, find_tritonserver, is_bundled, pytriton_dist

__all__ = ["backend_dir", "server_env", "ENV_CACHE_DIR"]

LOGGER = logging.getLogger(__name__)

ENV_CACHE_DIR = "CRAFT_CACHE_DIR"
_STUB_NAME = "triton_python_backend_stub"


def _cache_root() -> Path:
    root = os.environ.get(ENV_CACHE_DIR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "craft"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _digest(parts: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _publish_dir(target: Path, build: Callable[[Path], object]) -> Path:
    """Build a folder next to ``target`` and rename it into place (atomic, race-safe).

    Concurrent callers may each build a copy; the first rename wins and the others
    discard theirs, so nobody ever sees a half-written ``target``.
    """
    if target.is_dir():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
            LOGGER.debug("prepared %s", target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def backend_dir(binary: Path | None = None, cache_root: Path | None = None) -> Path:
    """Backends directory for ``binary`` (default: :func:`find_tritonserver`).

    A non-bundled server (NGC container, custom build) ships a working
    ``<prefix>/backends``; it is returned as is. For pytriton's binary the wheel's
    ``backends/`` is copied into ``<cache>/triton-backends-<hash>/`` with the stub for
    the running Python placed next to ``python/libtriton_python.so``. The hash covers
    the backend files and the stub, so upgrading pytriton or Python makes a new folder.
    """
    binary = binary or find_tritonserver()
    if not is_bundled(binary):
        return binary.resolve().parent.parent / "backends"
    dist = pytriton_dist()
    assert dist is not None
    source = dist / "backends"
    stub = dist / "python_backend_stubs" / _python_version() / _STUB_NAME
    if not stub.is_file():
        available = sorted(p.name for p in (dist / "python_backend_stubs").iterdir() if p.is_dir())
        raise TritonServerError(
            f"pytriton has no Python-backend stub for Python {_python_version()} "
            f"(looked for {stub}; available: {', '.join(available) or 'none'})"
        )
    files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    parts = [_python_version().encode()]
    for path in [*files, stub]:
        parts += [str(path.relative_to(dist)).encode(), path.read_bytes()]
    target = (cache_root or _cache_root()) / f"triton-backends-{_digest(parts)}"

    def build(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        dest = tmp / "python" / _STUB_NAME
        shutil.copy2(stub, dest)
        dest.chmod(0o755)

    return _publish_dir(target, build)


# --------------------------------------------------------------------------- environment


def _join_paths(*groups: Sequence[str] | str | None) -> str:
    """Join path lists in order, dropping empties and later duplicates."""
    seen: dict[str, None] = {}
    for group in groups:
        if not group:
            continue
        for entry in group.split(os.pathsep) if isinstance(group, str) else group:
            if entry:
                seen.setdefault(entry, None)
    return os.pathsep.join(seen)


def _interpreter_bin() -> Path:
    """Folder whose ``python3`` the stub must find first on PATH (the venv's ``bin/``)."""
    bindir = Path(sys.executable).parent
    if not (bindir / "python3").exists():
        raise TritonServerError(
            f"{bindir} has no 'python3'; the Python-backend stub finds its environment by "
            "looking up 'python3' on PATH, so run from a virtualenv/interpreter that provides it"
        )
    return bindir


def _libpython_dir() -> str:
    """``LIBDIR`` holding this interpreter's shared libpython (warn if there is none)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{_python_version()}.so.1.0"
    if not (Path(libdir) / soname).exists():
        LOGGER.warning(
            "%s not found in %s (interpreter built without --enable-shared?); the Python-backend "
            "stub will load whatever %s the system has, which may not match this stdlib",
            soname,
            libdir or "LIBDIR",
            soname,
        )
    return libdir


def server_env(binary: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver so Python-backend stubs run in *this* interpreter's env.

    * ``PATH``: this interpreter's ``bin/`` first. The stub embeds CPython with an
      *isolated* config (``PYTHONPATH``/``PYTHONHOME`` are ignored, ``sys.flags.isolated``
      is 1); its prefix is found by looking up ``python3`` on ``PATH``. When that is the
      venv's ``bin/python3``, ``pyvenv.cfg`` is honoured: venv site-packages (and only
      those), ``.pth`` files processed (editable installs work), ``sys.executable`` is the
      venv's python.
    * ``LD_LIBRARY_PATH``: the interpreter's ``LIBDIR`` first, so the stub loads this
      interpreter's ``libpython3.X.so.1.0`` rather than the distribution's (whose patch
      level need not match the stdlib being imported), then pytriton's bundled libs
      (``nvidia_pytriton.libs``; the backend's ``$ORIGIN`` RPATH breaks once copied).

    Everything else is inherited from ``base`` (default ``os.environ``).
    """
    binary = binary or find_tritonserver()
    env = dict(os.environ if base is None else base)
    libdirs = [_libpython_dir()]
    dist = pytriton_dist()
    if dist is not None and is_bundled(binary):
        libdirs.append(str(dist.parent.parent / "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = _join_paths(libdirs, env.get("LD_LIBRARY_PATH"))
    env["PATH"] = _join_paths([str(_interpreter_bin())], env.get("PATH", os.defpath))
    return env


