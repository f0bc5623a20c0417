"""``craft serve``: tritonserver on a model repository, in the foreground, with clean shutdown."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .common import HelpFormatter

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from craft_serving.serve import prepare_server
    from craft_serving.triton_server import TritonServerError

    server, view = prepare_server(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                                  metrics_port=args.metrics_port, log_file=args.log_file, timeout=args.timeout)
    config = server.config
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        try:
            seconds = server.wait_ready()
        except TritonServerError as exc:
            print(f"craft: error: tritonserver did not become ready: {exc}", file=sys.stderr)
            print(server.log_tail(40), file=sys.stderr)
            return 1
        print(f"serving {view.arch} repository {config.repo} ({len(view.catalog)} LoRAs) after {seconds:.1f} s",
              flush=True)
        print(f"  HTTP    {config.http_url}\n  gRPC    {config.grpc_url}\n  metrics {config.metrics_url}", flush=True)
        print(f"  log     {server.log_path}", flush=True)
        while not stop.wait(0.5):
            if not server.running:
                print("craft: error: tritonserver exited unexpectedly", file=sys.stderr)
                print(server.log_tail(40), file=sys.stderr)
                return 1
        print("stopping tritonserver", flush=True)
        return 0
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def register(sub) -> None:
    p = sub.add_parser("serve", formatter_class=HelpFormatter, help="run tritonserver on a model repository")
    p.add_argument("--repo", required=True, help="model repository folder (craft export --out)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port on 127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on 127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port on 127.0.0.1")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to become ready")
    p.add_argument("--log-file", help="server log file (default: <REPO>-tritonserver.log in the folder that "
                                      "holds REPO, e.g. out/repo-sd15-tritonserver.log for --repo out/repo-sd15)")
    p.set_defaults(func=run)
