"""``kill -9`` of one Python-backend stub of a running ``craft serve`` while clients run, and what they saw.

Shared by the short default-suite test (``test_serving.py``) and the extended ones
(``test_stub_faults.py``). Readiness is sampled every 50 ms over HTTP from the moment of the kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import psutil

from craft_client import AsyncCraftClient, CraftClient
from craft_serving.stub_watch import stubs_of

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def tritonserver_pid(craft_pid: int) -> int:
    (pid,) = [p.pid for p in psutil.Process(craft_pid).children() if p.name() == "tritonserver"]
    return pid


def stub_pid(craft_pid: int, instance: str) -> int:
    (pid,) = [s.pid for s in stubs_of(tritonserver_pid(craft_pid)).values() if s.instance == instance]
    return pid


def status(http: str, path: str) -> int:
    try:
        with _NO_PROXY.open(f"http://{http}{path}", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return -1


@dataclass
class Outcome:
    """One client request: when it ended (seconds from the kill), its images or its error."""

    ended: float | None = None
    images: np.ndarray | None = None
    error: Exception | None = None


@dataclass
class KillReport:
    model: str
    outcomes: list[Outcome]
    #: (seconds from the kill, /v2/health/ready status, /v2/models/<model>/ready status)
    readiness: list[tuple[float, int, int]] = field(default_factory=list)
    #: the ``probe`` request, sent once readiness said "not ready"
    probe: Outcome | None = None

    @property
    def not_ready_at(self) -> float | None:
        """First sample where the server and the model both answered "not ready" (-1: no answer in 2 s)."""
        return next((t for t, srv, mod in self.readiness if srv not in (200, -1) and mod not in (200, -1)), None)

    @property
    def ready_again_at(self) -> float | None:
        gone = self.not_ready_at
        if gone is None:
            return None
        return next((t for t, srv, mod in self.readiness if t > gone and srv == 200 and mod == 200), None)


def kill_stub_under_load(served, instance: str, jobs: list[tuple], *,
                         probe: tuple[str, dict] | None = None, in_flight_after: float = 1.0,
                         timeout: float = 240.0) -> KillReport:
    """Start one gRPC client per job (``(prompt, fields, stream[, opts])``; ``opts``: the client's ``url``,
    its other keywords, ``aio=True``: a streaming AsyncCraftClient), kill ``instance``'s stub once every
    request is in flight (streams: each has had its first progress message; unary ones: sent
    ``in_flight_after`` seconds before), and sample readiness until the model is back. ``probe``: a
    unary request sent when readiness first says "not ready"."""
    model = instance.rsplit("_", 2)[0]
    pid = stub_pid(served.proc.pid, instance)
    t0 = [None]  # monotonic time of the kill
    started = threading.Barrier(len(jobs) + 1)
    outcomes: list[Outcome] = [Outcome() for _ in jobs]

    def since() -> float:
        return time.monotonic() - t0[0] if t0[0] is not None else -1.0

    def run(i: int, prompt: str, fields: dict, stream: bool, opts: dict | None = None) -> None:
        out, opts = outcomes[i], dict(opts or {})
        try:
            if opts.pop("aio", False):
                asyncio.run(_astream(served, prompt, fields, opts, out, started, timeout))
                return
            with CraftClient(opts.pop("url", served.grpc), timeout=timeout, **opts) as client:
                if stream:
                    first = True
                    for event in client.stream(prompt, **fields):
                        if first:
                            started.wait(timeout)
                            first = False
                        if event.result is not None:
                            out.images = event.result.images
                else:
                    started.wait(timeout)
                    out.images = client.generate(prompt, **fields).images
        except Exception as exc:  # noqa: BLE001 - what each request got is the result
            out.error = exc
            started.abort()  # a request that fails before the kill ends the wait (harmless after it)
        finally:
            out.ended = since()

    workers = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for w in workers:
        w.start()
    try:
        started.wait(timeout)
    except threading.BrokenBarrierError:
        raise AssertionError(f"a request failed before the kill: {[o.error for o in outcomes if o.error]}") from None
    if not all(job[2] for job in jobs):
        time.sleep(in_flight_after)
    t0[0] = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    report = KillReport(model, outcomes)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report.readiness.append((since(), status(served.http, "/v2/health/ready"),
                                 status(served.http, f"/v2/models/{model}/ready")))
        if probe is not None and report.probe is None and report.not_ready_at is not None:
            report.probe = Outcome()
            workers.append(threading.Thread(target=_probe, args=(served, probe, report.probe, since, timeout)))
            workers[-1].start()
        if report.ready_again_at is not None and not any(w.is_alive() for w in workers):
            break
        time.sleep(0.05)
    for w in workers:
        w.join(timeout)
    return report


def _probe(served, request: tuple[str, dict], out: Outcome, since, timeout: float) -> None:
    try:
        with CraftClient(served.grpc, timeout=timeout) as client:
            out.images = client.generate(request[0], **request[1]).images
    except Exception as exc:  # noqa: BLE001
        out.error = exc
    finally:
        out.ended = since()


async def _astream(served, prompt: str, fields: dict, opts: dict, out: Outcome, started: threading.Barrier,
                   timeout: float) -> None:
    async with AsyncCraftClient(opts.pop("url", served.grpc), timeout=timeout, **opts) as client:
        first = True
        async for event in client.stream(prompt, **fields):
            if first:
                await asyncio.to_thread(started.wait, timeout)
                first = False
            if event.result is not None:
                out.images = event.result.images
