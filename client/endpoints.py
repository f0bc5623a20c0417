"""Several server endpoints behind one client: round-robin, and failover when a replica is gone.

A call starts on the next endpoint in turn. When the endpoint cannot be reached or stops
answering (connection refused or reset, gRPC ``UNAVAILABLE``, HTTP 502/503/504, a model that is
being reloaded and so "has no available versions") the call moves
on to the next endpoint, up to a bounded number of retries, with a short backoff once every
endpoint has been tried. Nothing else is retried: a refused request (``INVALID_ARG``: a field
the server rejects) fails at once, on any endpoint, and so does a streamed request that has
already delivered a message.

Generation is deterministic in its inputs (the seed fixes the noise), so running a request
again on another replica gives the same images; a retried request can at worst have done
its work twice.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["parse_endpoints", "is_unavailable", "RetryPolicy", "Rotation"]

_UNAVAILABLE_STATUS = {"StatusCode.UNAVAILABLE", "502", "503", "504"}
_NO_VERSIONS = "has no available versions"


def parse_endpoints(url: str | Sequence[str]) -> tuple[str, ...]:
    """``"h1:8001,h2:8001"`` or ``["h1:8001", "h2:8001"]`` -> the endpoints, in order, without duplicates."""
    parts = [url] if isinstance(url, str) else list(url)
    if not all(isinstance(p, str) for p in parts):
        raise ValueError(f"url: endpoints must be 'HOST:PORT' strings, got {url!r}")
    endpoints: list[str] = []
    for part in parts:
        for item in part.split(","):
            item = item.strip()
            if not item:
                continue
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"url: each endpoint must be HOST:PORT, got {item!r}")
            if item not in endpoints:
                endpoints.append(item)
    if not endpoints:
        raise ValueError(f"url: no endpoint given, got {url!r}")
    return tuple(endpoints)


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the endpoint is unreachable or gone, not that it refused the request."""
    if isinstance(exc, (ConnectionError, TimeoutError)):  # refused / reset / aborted sockets (HTTP)
        return True
    if isinstance(exc, OSError):  # other socket errors: unreachable host, name resolution
        return True
    status = getattr(exc, "status", None)
    status = status() if callable(status) else status
    if str(status) in _UNAVAILABLE_STATUS:
        return True
    # a model between an unload and its load (craft serve's stub watchdog reloading the pipeline):
    # Triton answers "unknown model ... has no available versions", which passes on another replica
    return _NO_VERSIONS in str(exc)


@dataclass(frozen=True)
class RetryPolicy:
    """How many further endpoints a call may try after the first, and the pause per full round.

    ``retries=None``: every other endpoint once (0 for a single endpoint, so a lone server's
    error arrives as before). ``backoff_s`` is waited each time the call comes back round to
    an endpoint it already tried, doubling per round up to ``max_backoff_s``.
    """

    retries: int | None = None
    backoff_s: float = 0.2
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if self.retries is not None and (isinstance(self.retries, bool) or not isinstance(self.retries, int)
                                         or not 0 <= self.retries <= 100):
            raise ValueError(f"retries: must be an integer in 0..100, got {self.retries!r}")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError(f"backoff_s: must be in 0..max_backoff_s ({self.max_backoff_s}), got {self.backoff_s!r}")

    def attempts(self, n_endpoints: int) -> int:
        return 1 + (n_endpoints - 1 if self.retries is None else self.retries)

    def pause(self, attempt: int, n_endpoints: int) -> float:
        """Seconds to wait before ``attempt`` (0-based): only when a new round starts."""
        if attempt == 0 or attempt % n_endpoints:
            return 0.0
        return min(self.backoff_s * 2 ** (attempt // n_endpoints - 1), self.max_backoff_s)


class Rotation:
    """Round-robin start positions, safe to share between threads."""

    def __init__(self, n: int):
        self.n = n
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def order(self, attempts: int) -> list[int]:
        """Endpoint indices for one call: ``attempts`` of them, from the next start, wrapping round."""
        with self._lock:
            start = next(self._counter) % self.n
        return [(start + k) % self.n for k in range(attempts)]
