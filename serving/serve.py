"""``craft serve``: tritonserver on a model repository, in the foreground, with clean shutdown."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .manifest import read_manifest
from .triton_server import ServerConfig, TritonServer, TritonServerError

__all__ = ["run_serve_cli", "serve_config"]


def serve_config(repo: Path, http_port: int, grpc_port: int, metrics_port: int) -> ServerConfig:
    """Explicit model control with every model loaded at start; later exports load on demand."""
    return ServerConfig(repo=repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                        model_control="explicit", load_models=("*",))


def run_serve_cli(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve()
    view = read_manifest(repo)  # fail fast, before starting anything, on a folder that is not a repository
    for port_name in ("http_port", "grpc_port", "metrics_port"):
        port = getattr(args, port_name)
        if not 0 < port < 65536:
            raise ValueError(f"--{port_name.replace('_', '-')} must be in 1..65535, got {port}")
    config = serve_config(repo, args.http_port, args.grpc_port, args.metrics_port)
    log_path = Path(args.log_file) if args.log_file else repo.parent / f"{repo.name}-tritonserver.log"
    server = TritonServer(config, log_path=log_path, ready_timeout=args.timeout)
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
        print(f"serving {view.arch} repository {repo} ({len(view.catalog)} LoRAs) after {seconds:.1f} s", flush=True)
        print(f"  HTTP    {config.http_url}\n  gRPC    {config.grpc_url}\n  metrics {config.metrics_url}", flush=True)
        print(f"  log     {log_path}", flush=True)
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
