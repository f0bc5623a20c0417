"""``craft serve``'s watchdog over the Python-backend stub processes of its tritonserver.

Why: Triton 2.51 does not restart a Python-backend stub that died (``kill -9``, the OOM killer, a
segfault in a native library). Every later request to that model fails with ``Stub process
'<instance>' is not healthy``, requests in flight on it hang for about 20 s before failing, and
``/v2/health/ready`` and ``/v2/models/<model>/ready`` keep answering 200.

What it does, every ``poll`` seconds (a scan of ``/proc``, no request to the server):

* every stub is a child of tritonserver whose command line names its model file
  (``<repo>/<model>/<version>/model.py``) and its instance (``<model>_<group>_<index>``);
* a stub that is gone while no other stub of the same instance runs (a reload starts the new
  instance before the old one exits) and while its model still answers ready (an unload or
  shutdown makes it not ready first) has crashed;
* the model is marked broken in the run folder (:class:`~craft_serving.shutdown.RunDir`): the
  pipeline models fail requests waiting on it at once (UNAVAILABLE, naming the model) instead of
  after Triton's own timeout, and refuse new ones that need it;
* it is unloaded and loaded again through Triton's model-control API with the admin key. From
  the unload until the load finishes, ``/v2/models/<model>/ready`` and (``--strict-readiness``)
  ``/v2/health/ready`` answer 400, so load balancers and Kubernetes readiness probes see the gap;
* a model whose stub dies more than ``max_reloads`` times within ``window`` seconds is not reloaded
  again (a crash loop is a bug to see, not to hide): it is unloaded, the reason is logged and
  :attr:`StubWatch.gave_up` set; ``craft serve`` then stops with exit status 1 so that readiness
  (and liveness) fail and the supervisor's restart count shows the loop.

Not solved here: the streams in flight on a dead *decoupled* stub (``craft_pipeline_stream``);
Triton 2.51 never ends them, and nothing outside tritonserver can. The client ends them: a stream
silent for longer than its stall bound fails with ``StreamStalled`` naming the model and the
address, is cancelled, and fails over (:mod:`craft_client.stall`). The reload brings the model back
for new streams.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .admin import HTTP_HEADER
from .shutdown import RunDir

__all__ = ["STUB_BINARY", "Stub", "WatchPolicy", "ModelControl", "StubWatch", "stubs_of"]

STUB_BINARY = "triton_python_backend_stub"
_GONE_STATES = {"Z", "X", "x"}  # zombie / dead: exited, maybe not reaped yet

# Loopback model control must never go through an HTTP(S)_PROXY from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process: ``model`` (the folder name) and its ``instance``."""

    pid: int
    model: str
    instance: str


def _stat(proc: Path) -> tuple[str, int] | None:
    """(state, parent pid) of a /proc entry, or None if it is gone."""
    try:
        text = (proc / "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ')'
    return fields[0], int(fields[1])


def stubs_of(server_pid: int, proc_root: Path = Path("/proc")) -> dict[int, Stub]:
    """The live (not zombie) Python-backend stubs that are children of ``server_pid``, by pid
    (none without a ``/proc``: the watchdog then watches nothing)."""
    found: dict[int, Stub] = {}
    if not proc_root.is_dir():
        return found
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(entry)
        if stat is None or stat[1] != server_pid or stat[0] in _GONE_STATES:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # argv: stub, model.py path, shm region, shm sizes, parent pid, lib dir, ipc handle, instance, ...
        if len(argv) < 9 or not argv[0].decode(errors="replace").endswith(STUB_BINARY):
            continue
        model_file = Path(argv[1].decode(errors="replace"))
        found[int(entry.name)] = Stub(int(entry.name), model_file.parent.parent.name, argv[8].decode(errors="replace"))
    return found


@dataclass(frozen=True)
class WatchPolicy:
    """``poll``: seconds between scans; at most ``max_reloads`` reloads of one model within ``window``
    seconds (one more death and it gives up); ``load_timeout``: seconds one load may take."""

    poll: float = 0.25
    max_reloads: int = 3
    window: float = 600.0
    load_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.poll <= 0 or self.window <= 0 or self.load_timeout <= 0:
            raise ValueError(f"poll, window and load_timeout must be > 0 (got {self})")
        if self.max_reloads < 0:
            raise ValueError(f"max_reloads must be >= 0 (got {self.max_reloads})")


class ModelControlError(RuntimeError):
    """A model-control call failed (names the model, the call and Triton's answer)."""


class ModelControl:
    """Triton's HTTP model readiness (open) and model control (with the admin key)."""

    def __init__(self, http_url: str, admin_key: str | None):
        self.base = f"http://{http_url}"
        self._headers = {HTTP_HEADER: admin_key} if admin_key else {}

    def _call(self, path: str, *, post: bool, timeout: float) -> tuple[int, str]:
        req = urllib.request.Request(self.base + path, data=b"{}" if post else None,
                                     headers=self._headers if post else {}, method="POST" if post else "GET")
        try:
            with _NO_PROXY.open(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def ready(self, model: str) -> bool | None:
        """True / False as Triton answers; None when the server does not answer (stopping, gone)."""
        try:
            return self._call(f"/v2/models/{urllib.parse.quote(model, safe='')}/ready", post=False, timeout=5)[0] == 200
        except (OSError, http.client.HTTPException):
            return None

    def _control(self, model: str, action: str, timeout: float) -> None:
        try:
            status, body = self._call(f"/v2/repository/models/{urllib.parse.quote(model, safe='')}/{action}",
                                      post=True, timeout=timeout)
        except (OSError, http.client.HTTPException) as exc:
            raise ModelControlError(f"{action} {model}: no answer from tritonserver ({exc})") from exc
        if status != 200:
            raise ModelControlError(f"{action} {model}: HTTP {status} {body.strip()[:300]}")

    def unload(self, model: str) -> None:
        """Starts the unload (Triton answers before in-flight requests have drained)."""
        self._control(model, "unload", 60)

    def load(self, model: str, timeout: float) -> None:
        """Loads (Triton answers once the model is ready, or failed to load)."""
        self._control(model, "load", timeout)


class StubWatch:
    """Polls the stubs of one tritonserver and reloads models whose stub died (module docstring).

    ``report`` receives one line per event (craft serve prints it and appends it to the server log).
    """

    def __init__(self, server_pid: int, control: ModelControl, run_dir: RunDir, *,
                 policy: WatchPolicy = WatchPolicy(), report: Callable[[str], None] = lambda line: None,
                 proc_root: Path = Path("/proc")):
        self.server_pid = server_pid
        self.control = control
        self.run_dir = run_dir
        self.policy = policy
        self.report = report
        self.proc_root = proc_root
        self.gave_up: str | None = None
        self.reloads: list[tuple[str, float, float]] = []  # (model, seconds from death seen to ready, when)
        self._deaths: dict[str, deque[float]] = defaultdict(deque)
        self._known = stubs_of(server_pid, proc_root)

    # -- one scan ------------------------------------------------------------------------------

    def crashed(self) -> dict[str, list[Stub]]:
        """Models with a stub that died since the last scan (and no replacement), by model."""
        now = stubs_of(self.server_pid, self.proc_root)
        running = {s.instance for s in now.values()}
        dead = [s for pid, s in self._known.items() if pid not in now and s.instance not in running]
        self._known = now
        out: dict[str, list[Stub]] = defaultdict(list)
        for stub in dead:
            out[stub.model].append(stub)
        # a model that is not ready (being unloaded or reloaded, or the server is stopping) lost
        # its stubs on purpose
        return {model: stubs for model, stubs in out.items() if self.control.ready(model)}

    def check(self) -> None:
        """One scan, and a reload (or giving up) for each model whose stub crashed."""
        for model, stubs in self.crashed().items():
            self._handle(model, stubs)
            if self.gave_up:
                return

    # -- recovery ------------------------------------------------------------------------------

    def _handle(self, model: str, stubs: list[Stub]) -> None:
        seen = time.monotonic()
        deaths = self._deaths[model]
        deaths.append(seen)
        while deaths and seen - deaths[0] > self.policy.window:
            deaths.popleft()
        which = ", ".join(f"{s.instance} (pid {s.pid})" for s in stubs)
        if len(deaths) > self.policy.max_reloads:
            self._give_up(model, f"{model}: its stub process died {len(deaths)} times within "
                                 f"{self.policy.window:g} s (last: {which}); not reloading it again "
                                 f"(max {self.policy.max_reloads}; a crash loop - see the log above)")
            return
        self.report(f"craft: stub process {which} of model {model} died; reloading {model} "
                    f"(reload {len(deaths)} of at most {self.policy.max_reloads} within {self.policy.window:g} s)")
        self.run_dir.mark_broken(model, f"its stub process {which} died; craft serve is reloading it, "
                                        "retry in a few seconds")
        for stub in stubs:  # its requests died with it: a later SIGTERM must not wait for them
            self.run_dir.forget_inflight(model, stub.pid)
        try:
            self.control.unload(model)
            self.control.load(model, self.policy.load_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure to come back ends in giving up
            self._give_up(model, f"{model}: reload after its stub process died failed: {exc}")
            return
        seconds = time.monotonic() - seen
        self.reloads.append((model, seconds, time.time()))
        # the model's new stubs; other models' entries stay, so a death seen meanwhile is not lost
        fresh = {pid: s for pid, s in stubs_of(self.server_pid, self.proc_root).items() if s.model == model}
        self._known = {**{pid: s for pid, s in self._known.items() if s.model != model}, **fresh}
        self.run_dir.clear_broken(model)
        self.report(f"craft: model {model} reloaded and ready {seconds:.1f} s after its stub process died")

    def _give_up(self, model: str, reason: str) -> None:
        self.run_dir.mark_broken(model, f"not available: {reason}")
        try:
            self.control.unload(model)  # requests get a clear 'unavailable' instead of a dead stub's error
        except Exception:  # noqa: BLE001 - giving up already; the log line says why
            pass
        self.gave_up = reason
        self.report(f"craft: error: {reason}; readiness is now false and craft serve stops")

    # -- thread --------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Scan until ``stop`` is set or the watchdog gives up (never raises)."""
        while not stop.wait(self.policy.poll) and not self.gave_up:
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - a watchdog that dies silently is worse
                self.report(f"craft: stub watchdog: scan failed ({type(exc).__name__}: {exc}); retrying")

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="craft-stub-watch", daemon=True)
        thread.start()
        return thread
