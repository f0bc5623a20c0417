"""``craft serve``: tritonserver on a model repository, in the foreground, with a graceful stop.

SIGTERM or Ctrl-C: new requests are refused, in-flight ones finish (up to ``--grace-period``), then
tritonserver stops and the command exits 0. A second signal cuts the wait short.

A Python-backend stub process that dies is noticed by a watchdog and its model reloaded
(:mod:`craft_serving.stub_watch`); a model that keeps dying ends ``craft serve`` with status 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from .common import HelpFormatter

__all__ = ["register", "run"]


class _StoppedDuringStart(Exception):
    """SIGTERM / SIGINT while tritonserver was still loading its models."""


def _wait(prepared, stop: threading.Event, watch) -> int | None:
    """Serve until a signal (None), until tritonserver dies or a model keeps crashing (exit status 1)."""
    server = prepared.server
    while not stop.wait(0.5):
        if not server.running:
            print("craft: error: tritonserver exited unexpectedly", file=sys.stderr)
            print(server.log_tail(40), file=sys.stderr)
            return 1
        if watch is not None and watch.gave_up:
            return 1  # the watchdog has printed why
    return None


def _reporter(log_path):
    """Watchdog lines go to stderr and into the server log (appended, one write per line)."""
    def report(line: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        print(stamped, file=sys.stderr, flush=True)
        try:
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(stamped + "\n")
        except OSError:
            pass
    return report


def _start_watch(prepared, args, stop: threading.Event):
    if args.max_stub_reloads < 0:
        return None
    from craft_serving.stub_watch import ModelControl, StubWatch, WatchPolicy

    server = prepared.server
    watch = StubWatch(server.pid, ModelControl(server.config.http_url, prepared.admin.value), prepared.run_dir,
                      policy=WatchPolicy(max_reloads=args.max_stub_reloads), report=_reporter(server.log_path))
    watch.start(stop)
    return watch


def _drain(prepared, grace: float, again: threading.Event) -> None:
    run_dir = prepared.run_dir
    run_dir.drain()
    print(f"stopping: refusing new requests, waiting up to {grace:g} s for {run_dir.inflight()} in flight",
          flush=True)
    drained, seconds = run_dir.wait_drained(grace, interrupt=again)
    if drained:
        print(f"in-flight requests finished after {seconds:.1f} s; stopping tritonserver", flush=True)
    else:
        print(f"{run_dir.inflight()} requests still running after {seconds:.1f} s; stopping tritonserver anyway",
              file=sys.stderr, flush=True)


def _announce(prepared, seconds: float) -> None:
    view, config, admin = prepared.view, prepared.server.config, prepared.admin
    print(f"serving {view.arch} repository {config.repo} ({len(view.catalog)} LoRAs) after {seconds:.1f} s",
          flush=True)
    print(f"  HTTP    {config.http_url}\n  gRPC    {config.grpc_url}\n  metrics {config.metrics_url}", flush=True)
    print(f"  log     {prepared.server.log_path}", flush=True)
    where = f"written to {admin.file} (set CRAFT_ADMIN_KEY to choose one)" if admin.file else f"from {admin.source}"
    print(f"  admin   model control, statistics, shared memory, trace need the admin key, {where}", flush=True)


def run(args: argparse.Namespace) -> int:
    from craft_serving.serve import prepare_server
    from craft_serving.triton_server import TritonServerError

    prepared = prepare_server(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, host=args.host, log_file=args.log_file,
                              timeout=args.timeout, admin_key=args.admin_key)
    server = prepared.server
    stop, again, ready = threading.Event(), threading.Event(), threading.Event()

    def on_signal(signum, _frame) -> None:
        if not ready.is_set():  # still loading: nothing is in flight, stop at once
            raise _StoppedDuringStart(signal.Signals(signum).name)
        (again if stop.is_set() else stop).set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
            seconds = server.wait_ready()
            ready.set()
        except TritonServerError as exc:
            print(f"craft: error: tritonserver did not become ready: {exc}", file=sys.stderr)
            return 1
        except _StoppedDuringStart as exc:
            print(f"{exc} before tritonserver was ready; stopping it", flush=True)
            return 0
        _announce(prepared, seconds)
        watch_stop = threading.Event()
        watch = _start_watch(prepared, args, watch_stop)
        try:
            status = _wait(prepared, stop, watch)
        finally:
            watch_stop.set()
        if status is not None:
            return status
        _drain(prepared, args.grace_period, again)
        return 0
    finally:
        server.stop(grace=15.0)
        prepared.run_dir.remove()
        for s, handler in previous.items():
            signal.signal(s, handler)


def register(sub) -> None:
    p = sub.add_parser("serve", formatter_class=HelpFormatter, help="run tritonserver on a model repository")
    p.add_argument("--repo", required=True, help="model repository folder (craft export --out)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the three endpoints bind to (0.0.0.0: every interface, as in the container)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to become ready")
    p.add_argument("--grace-period", type=float, default=60.0,
                   help="on SIGTERM / Ctrl-C: seconds in-flight requests may take to finish while new ones are "
                        "refused, before tritonserver stops")
    p.add_argument("--admin-key", help="key for Triton's model-control, statistics, shared-memory, trace and "
                                       "logging APIs (default: $CRAFT_ADMIN_KEY, else a random key written "
                                       "beside the log)")
    p.add_argument("--max-stub-reloads", type=int, default=3,
                   help="a model whose Python-backend stub process dies is reloaded; after this many reloads "
                        "within 10 minutes the next death stops craft serve with status 1 (a crash loop); "
                        "-1: no watchdog")
    p.add_argument("--log-file", help="server log file (default: <REPO>-tritonserver-<HTTP_PORT>.log in the folder "
                                      "that holds REPO, e.g. out/repo-sd15-tritonserver-8000.log for --repo "
                                      "out/repo-sd15)")
    p.set_defaults(func=run)
