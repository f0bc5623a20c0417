"""The client's errors - a server that refused or failed a request, one that could not be reached,
a stream that went silent (:mod:`craft_client.stall`) - and the conversion of tritonclient's and
the sockets' exceptions into them (:func:`wrap`; :func:`retryable`: worth another endpoint)."""

from __future__ import annotations

import http.client

from .endpoints import is_unavailable

__all__ = ["CraftServerError", "CraftConnectionError", "StreamStalled", "wrap", "retryable"]


class CraftServerError(RuntimeError):
    """The server refused or failed a request; ``status`` is the protocol's status text."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class CraftConnectionError(CraftServerError):
    """No answer from a craft server at the address (``status`` is ``"UNREACHABLE"``)."""

    def __init__(self, url: str, protocol: str, reason: str):
        port = "HTTP (8000 by default)" if protocol == "http" else "gRPC (8001 by default)"
        super().__init__(f"could not reach a server at {url} over {protocol}: {reason}; check that craft serve "
                         f"is running there and that {url} is its {port} port", "UNREACHABLE")
        self.url, self.protocol, self.reason = url, protocol, reason
        self.endpoints: tuple[str, ...] = (url,)


class StreamStalled(CraftServerError):
    """A streamed request sent nothing for longer than its stall bound (``status`` is ``"STALLED"``).

    ``model`` and ``url`` name where it ran, ``silent`` the seconds without a message, ``bound``
    the bound it broke and ``step`` / ``total`` the last progress it reported.
    """

    def __init__(self, model: str, url: str, *, silent: float, bound: float, how: str, step: int, total: int):
        where = f"after step {step} of {total}" if step > 0 else "before its first message"
        super().__init__(f"{model} at {url}: the stream stalled, no message for {silent:.1f} s {where} (bound "
                         f"{bound:.1f} s: {how}); the server process running {model} probably died "
                         "(craft serve reloads it): retry the request", "STALLED")
        self.model, self.url, self.silent, self.bound, self.step, self.total = model, url, silent, bound, step, total


#: gRPC messages of a channel that never reached a server (as opposed to a server's UNAVAILABLE answer)
_GRPC_UNREACHED = ("failed to connect", "connection refused", "socket closed", "connections to all backends failing",
                   "dns resolution failed", "connection reset", "http1.x", "name resolution", "no route to host")


def wrap(exc: BaseException, url: str, protocol: str) -> CraftServerError:
    """A tritonclient (or socket) exception as :class:`CraftServerError` / :class:`CraftConnectionError`."""
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    status = exc.status() if hasattr(exc, "status") and callable(exc.status) else None
    if protocol == "http" and not hasattr(exc, "status"):  # a socket or HTTP parser error: no server answered
        reason = {ConnectionRefusedError: "connection refused (nothing listens there)"}.get(type(exc))
        if reason is None and isinstance(exc, http.client.HTTPException):
            reason = "the answer is not HTTP (is it the gRPC port?)"
        return CraftConnectionError(url, protocol, reason or f"{type(exc).__name__}: {message or exc}")
    if protocol == "grpc" and "UNAVAILABLE" in str(status) and any(m in message.lower() for m in _GRPC_UNREACHED):
        reason = message.split(": ", 1)[-1] if message.startswith("failed to connect") else message
        if "socket closed" in message.lower() or "http1.x" in message.lower():
            reason += " (is it the HTTP port?)"
        return CraftConnectionError(url, protocol, reason)
    return CraftServerError(message or str(exc), status)


def retryable(exc: BaseException, wrapped: CraftServerError) -> bool:
    """Worth another endpoint: unreachable, cut off, or answering UNAVAILABLE (draining)."""
    return isinstance(wrapped, CraftConnectionError) or is_unavailable(exc)
