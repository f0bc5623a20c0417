"""Launch a real NVIDIA Triton Inference Server for local runs, tests and CPU-only CI.

The binary comes from :func:`craft_export.triton_locate.find_tritonserver`; pytriton's bundled
one gets the backends directory and environment of :mod:`craft_serving.triton_env`.

Typical use::

    config = ServerConfig.with_free_ports(repo)
    with TritonServer(config) as server:      # starts and waits for /v2/health/ready
        client = tritonclient.http.InferenceServerClient(config.http_url)
"""

from __future__ import annotations

import atexit
import http.client
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
import weakref
from collections import deque
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from craft_export.triton_locate import (
    TritonServerError,
    bundled_tritonserver,
    find_tritonserver,
    is_bundled,
    pytriton_dist,
)

from .admin import restricted_args
from .triton_env import backend_dir, server_env

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
    "reserve_ports",
    "interrupt",
]

LOGGER = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MODEL_CONTROL_MODES = ("none", "poll", "explicit")


def _parent_death_signal() -> None:
    """In the child before exec: SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


# --------------------------------------------------------------------------- config


def reserve_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on loopback that were free a moment ago (all held at once while
    chosen, so they differ; the usual small race with other processes applies)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]


_reserve_ports = reserve_ports


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (the usual small race applies)."""
    return reserve_ports(1)[0]


def interrupt(proc: subprocess.Popen, grace: float = 30.0) -> int:
    """Stop a `craft serve` process: SIGINT (it stops its tritonserver), SIGKILL after ``grace`` s.

    Returns the exit code. A SIGKILL first would orphan the tritonserver it started.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@dataclass(frozen=True)
class ServerConfig:
    """How to run one tritonserver. Endpoints bind to ``host`` (default loopback only).

    ``load_models`` are the ``--load-model`` names for ``model_control="explicit"``
    (``"*"``: everything in the repository); other modes ignore them. ``admin_key``: restrict
    Triton's admin APIs to requests carrying it (:mod:`craft_serving.admin`).
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
    #: model modules are imported twice (a slow start for torch-importing models). Turn it
    #: on for minimal ONNX/TensorRT configs that rely on Triton filling in inputs/outputs.
    auto_complete_config: bool = False
    host: str = LOOPBACK
    admin_key: str | None = field(default=None, repr=False)
    #: Linux: tritonserver gets SIGTERM when the thread that started it dies (``craft serve`` killed
    #: with SIGKILL would otherwise leave it running, holding the ports). Start it from a thread that
    #: lives as long as the server.
    die_with_parent: bool = False

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
    def connect_host(self) -> str:
        """Where a local client reaches the server: ``host``, or loopback for a wildcard bind."""
        host = {"0.0.0.0": LOOPBACK, "": LOOPBACK, "::": "::1"}.get(self.host, self.host)
        return f"[{host}]" if ":" in host else host

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http expects it."""
        return f"{self.connect_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` as tritonclient.grpc expects it."""
        return f"{self.connect_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus endpoint URL."""
        return f"http://{self.connect_host}:{self.metrics_port}/metrics"


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
        f"--http-address={config.host}",
        f"--http-port={config.http_port}",
        f"--grpc-address={config.host}",
        f"--grpc-port={config.grpc_port}",
        f"--metrics-address={config.host}",
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
    if config.admin_key:
        args += restricted_args(config.admin_key)
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
        dist = pytriton_dist()
        if is_bundled(self.binary) and dist is not None and (dist / "caches").is_dir():
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
        shown = [a.replace(self.config.admin_key, "***") if self.config.admin_key else a for a in cmd]
        LOGGER.info("starting tritonserver (log: %s): %s", self.log_path, " ".join(shown))
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_parent_death_signal if self.config.die_with_parent else None,
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
