"""The admin key of ``craft serve``: Triton's model-control, shared-memory, trace and other admin APIs
answer only requests that carry it (tritonserver's ``--http-restricted-api`` / ``--grpc-restricted-protocol``).

Inference, health and metadata stay open. The key comes from ``--admin-key``, else from
``$CRAFT_ADMIN_KEY``; with neither, a random key is made for this start and written to a file only
its owner can read (the path is printed, the key never is). Pipeline models load their networks
through Triton's in-process API (BLS ``load_model``), which the restriction does not cover.

Clients send the key as the HTTP header ``admin-key`` or the gRPC metadata
``triton-grpc-protocol-admin-key`` (Triton prefixes restricted gRPC headers with
``triton-grpc-protocol-``).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV_ADMIN_KEY", "RESTRICTED_APIS", "HTTP_HEADER", "GRPC_HEADER", "AdminKey", "AdminKeyError",
           "resolve_admin_key", "restricted_args", "admin_headers", "key_file_for"]

ENV_ADMIN_KEY = "CRAFT_ADMIN_KEY"
#: Triton API groups that need the key; "health", "metadata" and "inference" stay open.
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
HTTP_HEADER = "admin-key"
GRPC_HEADER = f"triton-grpc-protocol-{HTTP_HEADER}"
_KEY = re.compile(r"^[A-Za-z0-9._~+/-]{16,256}$")  # no ',', ':', '=' or spaces: they delimit Triton's flag


class AdminKeyError(ValueError):
    """An admin key that cannot be used (too short, or characters Triton's flag syntax reserves)."""


@dataclass(frozen=True)
class AdminKey:
    value: str
    source: str  # "--admin-key" | "$CRAFT_ADMIN_KEY" | "generated"
    file: Path | None = None  # where a generated key was written

    def __repr__(self) -> str:  # never in a log or traceback by accident
        return f"AdminKey(source={self.source!r}, file={self.file!r})"


def key_file_for(log_path: Path) -> Path:
    """Where a generated key goes: beside the server log (``<log stem>.admin-key``)."""
    log_path = Path(log_path)
    return log_path.with_name(f"{log_path.stem}.admin-key")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def resolve_admin_key(flag: str | None, env: Mapping[str, str], key_file: Path) -> AdminKey:
    """The key from the flag, else the environment, else a new random one written to ``key_file``."""
    for source, value in (("--admin-key", flag), (f"${ENV_ADMIN_KEY}", env.get(ENV_ADMIN_KEY))):
        if value:
            if not _KEY.match(value):
                raise AdminKeyError(f"{source}: the admin key must be 16-256 characters of A-Z a-z 0-9 . _ ~ + / - "
                                    f"(got {len(value)} characters)")
            return AdminKey(value, source)
    value = secrets.token_urlsafe(32)
    _write_private(key_file, value + "\n")
    return AdminKey(value, "generated", key_file)


def restricted_args(key: str) -> list[str]:
    """tritonserver flags restricting :data:`RESTRICTED_APIS` on both endpoints to requests with ``key``."""
    apis = ",".join(RESTRICTED_APIS)
    return [f"--http-restricted-api={apis}:{HTTP_HEADER}={key}",
            f"--grpc-restricted-protocol={apis}:{HTTP_HEADER}={key}"]


def admin_headers(key: str, protocol: str) -> dict[str, str]:
    """Headers for a tritonclient call to a restricted API (``headers=`` of e.g. ``unload_model``)."""
    return {GRPC_HEADER if protocol == "grpc" else HTTP_HEADER: key}
