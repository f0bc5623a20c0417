"""``craft serve``: tritonserver on a model repository, in the foreground, with clean shutdown.

The CLI (:mod:`craft_cli.serve`) prints and handles signals; this module checks the
repository and the ports, and starts the server.
"""

from __future__ import annotations

from pathlib import Path

from .manifest import RepoView, read_manifest
from .triton_server import ServerConfig, TritonServer

__all__ = ["serve_config", "default_log_path", "prepare_server"]


def serve_config(repo: Path, http_port: int, grpc_port: int, metrics_port: int) -> ServerConfig:
    """Explicit model control with every model loaded at start; later exports load on demand."""
    return ServerConfig(repo=repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                        model_control="explicit", load_models=("*",))


def default_log_path(repo: Path) -> Path:
    """Where the server log goes unless told: ``<REPO>-tritonserver.log`` beside the repository."""
    repo = Path(repo).resolve()
    return repo.parent / f"{repo.name}-tritonserver.log"


def prepare_server(repo: Path, *, http_port: int, grpc_port: int, metrics_port: int,
                   log_file: Path | None = None, timeout: float = 300.0) -> tuple[TritonServer, RepoView]:
    """A (not yet started) server for a model repository, and the repository's manifest.

    Fails fast, before anything starts, on a folder that is not a repository or a bad port.
    """
    repo = Path(repo).resolve()
    view = read_manifest(repo)
    for flag, port in (("--http-port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port)):
        if not 0 < port < 65536:
            raise ValueError(f"{flag} must be in 1..65535, got {port}")
    config = serve_config(repo, http_port, grpc_port, metrics_port)
    log_path = Path(log_file) if log_file else default_log_path(repo)
    return TritonServer(config, log_path=log_path, ready_timeout=timeout), view
