"""Graceful stop of ``craft serve``: refuse new requests, let in-flight ones finish, then stop Triton.

Why not just pass SIGTERM on to tritonserver: a pipeline request in the middle of its sampling
loop still needs one BLS call to the UNet models per remaining step, and tritonserver, once it is
shutting down, counts those as new requests it may refuse; it also bounds its own wait
(``--exit-timeout-secs``) regardless of the pipeline's progress.

So ``craft serve`` drains first, through a folder it shares with its pipeline models (the path
travels in ``$CRAFT_RUN_DIR``, which tritonserver's stub processes inherit):

* ``draining`` - created by craft serve on SIGTERM; a pipeline model refuses every request that
  arrives after it with UNAVAILABLE (gRPC ``UNAVAILABLE``), so clients retry elsewhere;
* ``inflight/<model>-<pid>`` - each pipeline stub's count of requests it is running, rewritten
  (atomically) when one starts or ends; craft serve waits for their sum to reach 0, at most the
  grace period, and only then stops tritonserver.

A stub that died without cleaning up leaves a stale count: the stub watchdog removes it when it
sees the stub gone (:meth:`RunDir.forget_inflight`), and the grace period bounds that wait too.

The same folder carries ``broken/<model>``: written by craft serve's stub watchdog
(:mod:`.stub_watch`) while it reloads a model whose stub process died, holding the reason. A
pipeline fails the requests that wait on that model (or need it) at once, with the reason, instead
of waiting for Triton's own timeout on the dead stub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ENV_RUN_DIR", "SHUTTING_DOWN", "RunDir", "DrainGate"]

ENV_RUN_DIR = "CRAFT_RUN_DIR"
DRAINING = "draining"
INFLIGHT = "inflight"
BROKEN = "broken"
SHUTTING_DOWN = "server is shutting down (craft serve received SIGTERM) and accepts no new requests; retry on another replica"


class RunDir:
    """craft serve's side: the shared folder, the drain flag, the in-flight sum."""

    def __init__(self, path: Path):
        self.path = Path(path)
        (self.path / INFLIGHT).mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls) -> "RunDir":
        return cls(Path(tempfile.mkdtemp(prefix="craft-serve-")))

    def env(self) -> dict[str, str]:
        return {ENV_RUN_DIR: str(self.path)}

    def drain(self) -> None:
        """From now on the pipeline models refuse new requests."""
        (self.path / DRAINING).write_text(f"{time.time():.3f}\n")

    @property
    def draining(self) -> bool:
        return (self.path / DRAINING).exists()

    def inflight(self) -> int:
        """Requests the pipeline models are running now (sum over stub processes)."""
        total = 0
        for entry in (self.path / INFLIGHT).iterdir():
            try:
                total += max(0, int(entry.read_text().strip() or 0))
            except (OSError, ValueError):  # a file being replaced; the next poll reads it
                continue
        return total

    def forget_inflight(self, model: str, pid: int) -> None:
        """Drop the count of a stub process that died (its requests died with it), so that a later
        SIGTERM does not wait the whole grace period for them."""
        (self.path / INFLIGHT / f"{model}-{pid}").unlink(missing_ok=True)

    def wait_drained(self, grace: float, interrupt: threading.Event | None = None, poll: float = 0.1) -> tuple[bool, float]:
        """Wait until nothing is in flight (True) or ``grace`` seconds pass / ``interrupt`` is set (False)."""
        start = time.monotonic()
        while True:
            if self.inflight() == 0:
                return True, time.monotonic() - start
            if time.monotonic() - start >= grace or (interrupt is not None and interrupt.is_set()):
                return False, time.monotonic() - start
            time.sleep(poll)

    def mark_broken(self, model: str, reason: str) -> None:
        """Pipelines fail requests that need ``model`` with ``reason`` until :meth:`clear_broken`."""
        folder = self.path / BROKEN
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{model}.tmp"
        tmp.write_text(reason)
        os.replace(tmp, folder / model)

    def clear_broken(self, model: str) -> None:
        (self.path / BROKEN / model).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class DrainGate:
    """A pipeline model's side: ``with gate.admit() as ok`` - ``ok`` False once craft serve drains.

    Without ``$CRAFT_RUN_DIR`` (tritonserver started by hand) every request is admitted and nothing
    is written.
    """

    def __init__(self, model: str, env: Mapping[str, str] | None = None):
        run_dir = (os.environ if env is None else env).get(ENV_RUN_DIR)
        self._dir = Path(run_dir) if run_dir else None
        self._file = self._dir / INFLIGHT / f"{model}-{os.getpid()}" if self._dir else None
        self._count = 0
        self._lock = threading.Lock()

    def _publish(self) -> None:
        if self._file is None:
            return
        tmp = self._file.with_name(f".{self._file.name}.tmp")
        try:
            tmp.write_text(f"{self._count}\n")
            os.replace(tmp, self._file)
        except OSError:  # the folder is gone: craft serve is past draining
            pass

    def _add(self, n: int) -> None:
        with self._lock:
            self._count += n
            self._publish()

    @property
    def draining(self) -> bool:
        return self._dir is not None and (self._dir / DRAINING).exists()

    def broken(self, models) -> tuple[str, str] | None:
        """(model, reason) for the first of ``models`` craft serve has marked broken, else None."""
        if self._dir is None:
            return None
        for model in models:
            try:
                return model, (self._dir / BROKEN / model).read_text()
            except OSError:  # not marked (the usual case), or cleared meanwhile
                continue
        return None

    @contextmanager
    def admit(self):
        # count first, then look at the flag: craft serve sets the flag, then reads the counts, so a
        # request is either refused here or counted before craft serve's first read
        self._add(1)
        try:
            yield not self.draining
        finally:
            self._add(-1)

    def close(self) -> None:
        if self._file is not None:
            self._file.unlink(missing_ok=True)
