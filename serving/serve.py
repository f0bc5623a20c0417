"""``craft serve``: tritonserver on a model repository, in the foreground, with a graceful stop.

The CLI (:mod:`craft_cli.serve`) prints and handles signals; this module checks the repository,
the ports and the admin key, and builds the server - everything that can fail does so here,
before a model is loaded.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .admin import AdminKey, resolve_admin_key, key_file_for
from .manifest import RepoView, check_models, read_manifest
from .shutdown import RunDir
from .triton_server import LOOPBACK, ServerConfig, TritonServer

__all__ = ["ServeError", "Prepared", "serve_config", "default_log_path", "check_ports", "prepare_server"]


class ServeError(ValueError):
    """``craft serve`` cannot start as asked (a port in use, a bad address); names the flag."""


@dataclass
class Prepared:
    """A server ready to start, and what ``craft serve`` reports about it."""

    server: TritonServer
    view: RepoView
    admin: AdminKey
    run_dir: RunDir


def serve_config(repo: Path, http_port: int, grpc_port: int, metrics_port: int, *, host: str = LOOPBACK,
                 models: tuple[str, ...] = ("*",), admin_key: str | None = None) -> ServerConfig:
    """Explicit model control: ``models`` (the manifest's) loaded at start, later exports load on demand.

    Loading by name, not ``*``, keeps Triton away from anything else in the folder (an export's
    ``.craft-staging``, models an older manifest named).
    """
    return ServerConfig(repo=repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                        model_control="explicit", load_models=models, host=host, admin_key=admin_key,
                        die_with_parent=True)


def default_log_path(repo: Path, http_port: int) -> Path:
    """Where the server log goes unless told: ``<REPO>-tritonserver-<HTTP port>.log`` beside the repository,
    so two servers (on different ports) never share a log."""
    repo = Path(repo).resolve()
    return repo.parent / f"{repo.name}-tritonserver-{http_port}.log"


def check_ports(host: str, ports: Mapping[str, int]) -> None:
    """Each port must be free on ``host`` now (bound and released at once), or a :class:`ServeError`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for flag, port in ports.items():
        if not 0 < port < 65536:
            raise ServeError(f"{flag}: must be in 1..65535 (got {port})")
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    reason = "is already in use (another craft serve or tritonserver?); choose another port"
                elif exc.errno == errno.EADDRNOTAVAIL:
                    raise ServeError(f"--host: {host} is not an address of this machine ({exc.strerror})") from exc
                else:
                    reason = f"cannot be bound ({exc.strerror})"
                raise ServeError(f"{flag}: port {port} on {host} {reason} (got {port})") from exc
            except socket.gaierror as exc:
                raise ServeError(f"--host: cannot resolve {host!r} ({exc.strerror})") from exc


def prepare_server(repo: Path, *, http_port: int, grpc_port: int, metrics_port: int, host: str = LOOPBACK,
                   log_file: Path | None = None, timeout: float = 300.0, admin_key: str | None = None,
                   env: Mapping[str, str] | None = None) -> Prepared:
    """A (not yet started) server for a model repository, with its manifest, admin key and run folder.

    Fails fast, before anything starts, on a folder that is not a repository, a manifest naming
    models the folder lacks, a port in use or a bad admin key.
    """
    env = os.environ if env is None else env
    repo = Path(repo).resolve()
    view = read_manifest(repo)
    check_models(view)
    ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
    if len(set(ports.values())) != len(ports):
        raise ServeError(f"--http-port, --grpc-port and --metrics-port must differ (got {list(ports.values())})")
    check_ports(host, ports)
    log_path = Path(log_file) if log_file else default_log_path(repo, http_port)
    admin = resolve_admin_key(admin_key, env, key_file_for(log_path))
    config = serve_config(repo, http_port, grpc_port, metrics_port, host=host, models=view.models,
                          admin_key=admin.value)
    run_dir = RunDir.create()
    server = TritonServer(config, log_path=log_path, ready_timeout=timeout, env={**env, **run_dir.env()})
    return Prepared(server, view, admin, run_dir)
