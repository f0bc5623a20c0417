"""Launch a real NVIDIA Triton Inference Server for local runs, tests and CPU-only CI.

Binaries are looked up in this order: ``$TRITONSERVER_BIN``, the NGC container's
``/opt/tritonserver/bin/tritonserver``, then the one bundled in the ``nvidia-pytriton``
wheel (``site-packages/pytriton/tritonserver``). The bundled binary needs:

* a backends directory whose ``python/`` folder holds the Python-backend stub built for
  the running interpreter (the wheel ships one stub per Python version). :func:`backend_dir`
  assembles it once under ``$CRAFT_CACHE_DIR`` (default ``~/.cache/craft``) and renames
  it into place atomically; the wheel itself is never modified;
* the environment from :func:`server_env`: this interpreter's ``bin/`` first on ``PATH``
  (the stub's embedded, *isolated* CPython ignores ``PYTHONPATH`` and finds its prefix
  by looking up ``python3`` on ``PATH``; the venv's ``pyvenv.cfg`` then gives it the
  venv's site-packages with ``.pth`` files processed, so editable installs such as
  ``craft_export`` -> ``export/`` import normally in ``model.py``), and ``LD_LIBRARY_PATH``
  with the interpreter's ``LIBDIR`` (matching ``libpython``) and pytriton's bundled libs.

Typical use::

    config = ServerConfig.with_free_ports(repo)
    with TritonServer(config) as server:      # starts and waits for /v2/health/ready
        client = tritonclient.http.InferenceServerClient(config.http_url)
"""

from __future__ import annotations

import atexit
import errno
import functools
import hashlib
import http.client
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "TritonServerError",
    "ServerConfig",
    "TritonServer",
    "find_tritonserver",
    "bundled_tritonserver",
    "backend_dir",
    "server_env",
    "server_args",
    "free_port",
]

LOGGER = logging.getLogger(__name__)

ENV_TRITONSERVER_BIN = "TRITONSERVER_BIN"
ENV_CACHE_DIR = "CRAFT_CACHE_DIR"
SYSTEM_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
LOOPBACK = "127.0.0.1"
MODEL_CONTROL_MODES = ("none", "poll", "explicit")

_STUB_NAME = "triton_python_backend_stub"


class TritonServerError(RuntimeError):
    """tritonserver could not be found, prepared, started, or did not become ready."""


# --------------------------------------------------------------------------- discovery


@functools.cache
def _pytriton_dist() -> Path | None:
    """``site-packages/pytriton/tritonserver`` of the installed wheel, without importing it."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def bundled_tritonserver() -> Path | None:
    """The ``tritonserver`` binary bundled in ``nvidia-pytriton``, or None if not installed."""
    dist = _pytriton_dist()
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
    dist = _pytriton_dist()
    tried.append(str(dist / "bin" / "tritonserver") if dist else "pytriton (not installed)")
    if bundled is not None and _is_executable(bundled):
        return bundled.resolve()
    raise TritonServerError(
        "tritonserver not found; tried: "
        + ", ".join(tried)
        + ". Install the 'serve' extra (pip install -e '.[serve]') or set "
        + ENV_TRITONSERVER_BIN
    )


def _is_bundled(binary: Path) -> bool:
    dist = _pytriton_dist()
    return dist is not None and binary.resolve().is_relative_to(dist.resolve())


# --------------------------------------------------------------------------- cache folders


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
    if not _is_bundled(binary):
        return binary.resolve().parent.parent / "backends"
    dist = _pytriton_dist()
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
    dist = _pytriton_dist()
    if dist is not None and _is_bundled(binary):
        libdirs.append(str(dist.parent.parent / "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = _join_paths(libdirs, env.get("LD_LIBRARY_PATH"))
    env["PATH"] = _join_paths([str(_interpreter_bin())], env.get("PATH", os.defpath))
    return env


# --------------------------------------------------------------------------- config


def _reserve_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (the usual small race applies)."""
    return _reserve_ports(1)[0]


@dataclass(frozen=True)
class ServerConfig:
    """How to run one tritonserver. Endpoints bind to loopback only.

    ``load_models`` are the ``--load-model`` names for ``model_control="explicit"``
    (``"*"``: everything in the repository); other modes ignore them.
    """

    repo: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    model_control: str = "explicit"
    load_models: tuple[str, ...] = ("*",)
    log_verbose: int = 0
    extra_args: tuple[str, ...] = ()
    #: Off by default (``--disable-auto-complete-config``): with it on, the Python backend
    #: starts one extra stub per Python model just to call ``auto_complete_config``, so
    #: model modules are imported twice (~2x startup with torch-importing models). Turn it
    #: on for minimal ONNX/TensorRT configs that rely on Triton filling in inputs/outputs.
    auto_complete_config: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "repo", Path(self.repo))
        object.__setattr__(self, "load_models", tuple(self.load_models))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ValueError(
                f"model_control must be one of {MODEL_CONTROL_MODES}, got {self.model_control!r}"
            )
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != len(ports):
            raise ValueError(f"http/grpc/metrics ports must differ, got {ports}")

    @classmethod
    def with_free_ports(cls, repo: Path | str, **kwargs: object) -> ServerConfig:
        """Config on three distinct free loopback ports."""
        http, grpc, metrics = _reserve_ports(3)
        return cls(Path(repo), http, grpc, metrics, **kwargs)  # type: ignore[arg-type]

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http expects it."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` as tritonclient.grpc expects it."""
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus endpoint URL."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"


def server_args(
    config: ServerConfig,
    backends: Path,
    shm_prefix: str,
    cache_directory: Path | None = None,
) -> list[str]:
    """Command-line flags (without the binary) for ``config``; ``extra_args`` come last."""
    args = [
        f"--model-repository={config.repo.resolve()}",
        f"--backend-directory={backends}",
        f"--http-address={LOOPBACK}",
        f"--http-port={config.http_port}",
        f"--grpc-address={LOOPBACK}",
        f"--grpc-port={config.grpc_port}",
        f"--metrics-address={LOOPBACK}",
        f"--metrics-port={config.metrics_port}",
        "--allow-gpu-metrics=false",
        "--allow-sagemaker=false",
        "--allow-vertex-ai=false",
        f"--model-control-mode={config.model_control}",
        *(f"--load-model={name}" for name in config.load_models if config.model_control == "explicit"),
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--exit-timeout-secs=10",
        *(() if config.auto_complete_config else ("--disable-auto-complete-config",)),
        f"--log-verbose={config.log_verbose}",
        # Unique per server: python-backend shm regions in /dev/shm otherwise collide
        # between servers on one host (hangs / segfaults).
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]
    if cache_directory is not None:
        args.append(f"--cache-directory={cache_directory}")
    return [*args, *config.extra_args]


# --------------------------------------------------------------------------- process


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except FileNotFoundError:
        return ""


# Loopback health checks must never go through an HTTP(S)_PROXY from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Servers run in their own session, so Ctrl-C in the parent does not reach them: stop
# whatever is still running when the interpreter exits normally.
_LIVE: weakref.WeakSet[TritonServer] = weakref.WeakSet()


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE):
        server.stop(grace=5.0)


class TritonServer:
    """One tritonserver process; stdout/stderr (stubs included) go to ``log_path``.

    The process runs in its own session so :meth:`stop` can take the Python-backend
    stubs down with it if tritonserver has to be killed.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        binary: Path | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.config = config
        self.binary = binary or find_tritonserver()
        self.ready_timeout = ready_timeout
        self.log_path = Path(log_path) if log_path else self._default_log_path()
        self.shm_prefix = f"craft_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._base_env = env
        # The stub puts '' (its cwd) first on sys.path: keep that a known, neutral folder.
        self.cwd = Path(cwd) if cwd else config.repo.resolve()
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _default_log_path() -> Path:
        fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(fd)
        return Path(name)

    # -- lifecycle --------------------------------------------------------------------

    def command(self) -> list[str]:
        """Full command line (prepares the backends directory if needed)."""
        cache_dir = None
        dist = _pytriton_dist()
        if _is_bundled(self.binary) and dist is not None and (dist / "caches").is_dir():
            cache_dir = dist / "caches"
        return [
            str(self.binary),
            *server_args(self.config, backend_dir(self.binary), self.shm_prefix, cache_dir),
        ]

    def start(self) -> TritonServer:
        """Spawn tritonserver (does not wait; see :meth:`wait_ready`)."""
        if self.running:
            raise TritonServerError(f"tritonserver already running (pid {self.pid})")
        if not self.config.repo.is_dir():
            raise TritonServerError(f"model repository {self.config.repo} is not a directory")
        cmd = self.command()
        env = server_env(self.binary, self._base_env)
        LOGGER.info("starting tritonserver (log: %s): %s", self.log_path, " ".join(cmd))
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float | None = None) -> float:
        """Poll ``/v2/health/ready`` until 200; returns seconds waited.

        Raises TritonServerError (with the log tail) if the process exits or time runs out.
        """
        proc = self._require_proc()
        timeout = self.ready_timeout if timeout is None else timeout
        url = f"http://{self.config.http_url}/v2/health/ready"
        start = time.monotonic()
        while True:
            code = proc.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} before becoming ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._probe(url):
                elapsed = time.monotonic() - start
                LOGGER.info("tritonserver ready on %s after %.1fs", self.config.http_url, elapsed)
                return elapsed
            if time.monotonic() - start > timeout:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    @staticmethod
    def _probe(url: str) -> bool:
        try:
            with _NO_PROXY.open(url, timeout=2.0) as resp:
                return resp.status == 200
        except (OSError, http.client.HTTPException):  # URLError/HTTPError (503) are OSErrors
            return False

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM; after ``grace`` seconds SIGKILL the whole process group (stubs too).

        Returns the exit code (None if never started). Idempotent.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            LOGGER.info("stopping tritonserver pid %d", proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                LOGGER.warning("tritonserver pid %d ignored SIGTERM for %.0fs; killing it", proc.pid, grace)
                # The leader is alive (not reaped), so its pgid cannot have been recycled.
                os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        _LIVE.discard(self)
        self._remove_shm()
        return code

    def _remove_shm(self) -> None:
        shm = Path("/dev/shm")
        if not shm.is_dir():
            return
        for region in shm.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    # -- introspection ----------------------------------------------------------------

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise TritonServerError("tritonserver not started")
        return self._proc

    @property
    def pid(self) -> int | None:
        """Process id of tritonserver (None before :meth:`start`)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the tritonserver process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        """Last ``n`` lines of the server log."""
        return _tail(self.log_path, n)

    # -- context manager --------------------------------------------------------------

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
