"""``CraftClient``: CRAFT-LoRA generation over Triton gRPC or HTTP, sync and asyncio.

    client = CraftClient("localhost:8001")                 # gRPC
    result = client.generate("a dog <c> in watercolor style <s>", content="dog", style="watercolor", seed=7)
    result.images[0]       # (H, W, 3) uint8
    result.pil()[0]        # PIL.Image

Server-side errors (an unknown LoRA, a size out of range...) raise :class:`CraftServerError`
with the server's message, which names the field and the value. A server that cannot be reached
(nothing listening, the other protocol's port, a connection cut) raises
:class:`CraftConnectionError` (a :class:`CraftServerError`) naming the address and the protocol.
Several replicas:

    client = CraftClient("10.0.0.1:8001,10.0.0.2:8001,10.0.0.3:8001")   # or a list

Calls go round-robin; one whose replica cannot be reached (or answers ``UNAVAILABLE``, as a
draining server does) moves on to the next, within a bounded retry budget
(:mod:`craft_client.endpoints`); a refused request is never sent again.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .endpoints import RetryPolicy, Rotation, is_unavailable, parse_endpoints
from .schema import CATALOG_MODEL, DTYPES, PIPELINE_MODEL, REQUEST_INPUTS, STREAM_MODEL

__all__ = ["CraftServerError", "CraftConnectionError", "GenerateResult", "Progress", "CraftClient", "AsyncCraftClient",
           "build_request"]

PROTOCOLS = ("grpc", "http")


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


#: gRPC messages of a channel that never reached a server (as opposed to a server's UNAVAILABLE answer)
_GRPC_UNREACHED = ("failed to connect", "connection refused", "socket closed", "connections to all backends failing",
                   "dns resolution failed", "connection reset", "http1.x", "name resolution", "no route to host")


@dataclass(frozen=True)
class GenerateResult:
    images: np.ndarray  # (N, H, W, 3) uint8
    notes: tuple[str, ...] = ()
    # id of the manifest the request was served under: the sha256 (hex) of the replica's manifest.json
    # (None: a repository exported before responses carried it)
    manifest: str | None = None

    def pil(self) -> list:
        from PIL import Image

        return [Image.fromarray(im) for im in self.images]


@dataclass(frozen=True)
class Progress:
    """One streamed message: ``step`` of ``total``, an optional preview, or the final result."""

    step: int
    total: int
    preview: np.ndarray | None = None
    result: GenerateResult | None = None
    manifest: str | None = None  # as GenerateResult.manifest, in every message of the stream


def build_request(prompt: str | Sequence[str], **fields: Any) -> dict[str, np.ndarray]:
    """Named numpy arrays for the pipeline's inputs; ``None`` fields are left out (server default)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    arrays = {"prompt": np.array([p.encode() for p in prompts], dtype=np.object_)}
    for name, value in fields.items():
        if name not in REQUEST_INPUTS:
            raise ValueError(f"unknown request field {name!r}; fields: {sorted(REQUEST_INPUTS)}")
        if value is None:
            continue
        dtype, dims, _ = REQUEST_INPUTS[name]
        np_dtype = DTYPES[dtype].numpy
        if np_dtype == "object":
            arrays[name] = np.array([str(value).encode()], dtype=np.object_)
        else:
            arr = np.asarray(value, dtype=np_dtype).reshape(-1)
            if arr.size != dims[0]:
                raise ValueError(f"{name} needs {dims[0]} value(s), got {value!r}")
            arrays[name] = arr
    return arrays


def _modules(protocol: str, aio: bool = False):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "grpc":
        if aio:
            import tritonclient.grpc.aio as mod
        else:
            import tritonclient.grpc as mod
    elif aio:
        import tritonclient.http.aio as mod
    else:
        import tritonclient.http as mod
    from tritonclient.utils import InferenceServerException

    errors: tuple[type[BaseException], ...] = (InferenceServerException,)
    if protocol == "http":  # the HTTP clients raise socket and parser errors of their own
        errors += (OSError, http.client.HTTPException)
        if aio:
            import aiohttp

            errors += (aiohttp.ClientError,)
    return mod, errors


def _inputs(mod, arrays: Mapping[str, np.ndarray]) -> list:
    out = []
    for name, arr in arrays.items():
        inp = mod.InferInput(name, list(arr.shape), REQUEST_INPUTS[name][0])
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _manifest(response) -> str | None:
    value = response.as_numpy("manifest")
    return _text(value.reshape(-1)[0]) if value is not None and value.size else None


def _result(response) -> GenerateResult:
    images = response.as_numpy("image")
    notes = response.as_numpy("notes")
    texts = tuple(_text(n) for n in (notes if notes is not None else []))
    return GenerateResult(images, texts, _manifest(response))


def _event(result) -> Progress:
    """One message of the streaming model: progress, or (with an image) the final result."""
    if result.as_numpy("image") is not None:
        final = _result(result)
        return Progress(-1, -1, result=final, manifest=final.manifest)
    return Progress(int(result.as_numpy("step")[0]), int(result.as_numpy("total_steps")[0]), result.as_numpy("preview"),
                    manifest=_manifest(result))


def _catalog(response) -> dict:
    return json.loads(response.as_numpy("catalog")[0])


def _wrap(exc: BaseException, url: str, protocol: str) -> CraftServerError:
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


def _retryable(exc: BaseException, wrapped: CraftServerError) -> bool:
    """Worth another endpoint: unreachable, cut off, or answering UNAVAILABLE (draining)."""
    return isinstance(wrapped, CraftConnectionError) or is_unavailable(exc)


class _Base:
    """What both clients share: endpoints, protocol, model names, timeout, request tensors."""

    def __init__(self, url: str | Sequence[str], protocol: str, model: str, stream_model: str,
                 timeout: float | None, aio: bool, retry: RetryPolicy | None = None):
        self.mod, self._exc = _modules(protocol, aio=aio)
        self._caught = (*self._exc, OSError)
        self.protocol = protocol
        self.model = model
        self.stream_model = stream_model
        self.timeout = timeout
        self.urls = parse_endpoints(url)
        self.url = ",".join(self.urls)
        self.retry = retry or RetryPolicy()
        self._rotation = Rotation(len(self.urls))
        if protocol == "http":  # one timeout for the whole connection; gRPC takes it per call
            kwargs = {"conn_timeout" if aio else "network_timeout": timeout or 600.0}
        else:
            kwargs = {}
        self.clients = [self.mod.InferenceServerClient(url=u, **kwargs) for u in self.urls]
        self.client = self.clients[0]

    def _attempts(self) -> list[tuple[float, int]]:
        """(pause before, endpoint index) for each attempt one call may make."""
        n = len(self.urls)
        return [(self.retry.pause(k, n), i) for k, i in enumerate(self._rotation.order(self.retry.attempts(n)))]

    def _failed(self, exc: BaseException, i: int, failures: list) -> None:
        """Record a retryable failure of endpoint ``i``; raise anything else at once."""
        wrapped = _wrap(exc, self.urls[i], self.protocol)
        if isinstance(exc, OSError) and not isinstance(wrapped, CraftConnectionError):  # a socket error, any protocol
            wrapped = CraftConnectionError(self.urls[i], self.protocol, f"{type(exc).__name__}: {exc}")
        if not _retryable(exc, wrapped):
            raise wrapped from exc
        failures.append((self.urls[i], wrapped, exc))

    def _give_up(self, failures: list) -> CraftServerError:
        """The error after every attempt failed: the endpoint's own for one attempt, else one naming all."""
        url, last, _ = failures[-1]
        if len(failures) == 1 or not isinstance(last, CraftConnectionError):
            return last
        tried = ", ".join(dict.fromkeys(u for u, _, _ in failures))
        error = CraftConnectionError(tried, self.protocol, f"{last.reason} (last of {len(failures)} attempts, at {url})")
        error.endpoints = tuple(dict.fromkeys(u for u, _, _ in failures))
        return error

    def _call(self, fn):
        """``fn(client)`` on the next endpoint, moving on while endpoints are unreachable."""
        failures: list = []
        for pause, i in self._attempts():
            time.sleep(pause)
            try:
                return fn(self.clients[i])
            except self._caught as exc:
                self._failed(exc, i, failures)
        raise self._give_up(failures) from failures[-1][2]

    async def _acall(self, fn):
        """:meth:`_call` for the asyncio client (``fn(client)`` returns an awaitable)."""
        failures: list = []
        for pause, i in self._attempts():
            await asyncio.sleep(pause)
            try:
                return await fn(self.clients[i])
            except self._caught as exc:
                self._failed(exc, i, failures)
        raise self._give_up(failures) from failures[-1][2]

    def _call_timeout(self) -> dict[str, float]:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" and self.timeout else {}

    def _outputs(self, names) -> list:
        return [self.mod.InferRequestedOutput(n) for n in names]

    def _check_stream(self) -> None:
        if self.protocol != "grpc":
            raise ValueError(f"protocol: streaming needs 'grpc' (got {self.protocol!r})")


class CraftClient(_Base):
    """Synchronous client over tritonclient gRPC (default) or HTTP.

    ``url``: ``HOST:PORT``, or several (a list or comma-separated) for replicas of one
    repository. ``timeout`` (seconds) bounds every call (gRPC) or the connection (HTTP; default
    600). ``retry`` bounds the failover between endpoints (default: each other endpoint once).
    """

    def __init__(self, url: str | Sequence[str], protocol: str = "grpc", *, model: str = PIPELINE_MODEL,
                 stream_model: str = STREAM_MODEL, timeout: float | None = None, retry: RetryPolicy | None = None):
        super().__init__(url, protocol, model, stream_model, timeout, aio=False, retry=retry)

    def ready(self) -> bool:
        """True when at least one endpoint is ready to serve the pipeline."""
        for client in self.clients:
            try:
                if client.is_server_ready() and client.is_model_ready(self.model):
                    return True
            except self._caught:  # refused connections surface as OSError over HTTP
                continue
        return False

    def generate(self, prompt: str | Sequence[str], **fields: Any) -> GenerateResult:
        """Images for one request (several prompts -> several images)."""
        inputs = _inputs(self.mod, build_request(prompt, **fields))  # no outputs named: every one the model sends
        return _result(self._call(lambda c: c.infer(self.model, inputs, **self._call_timeout())))

    def stream(self, prompt: str | Sequence[str], *, cancel: threading.Event | None = None,
               **fields: Any) -> Iterator[Progress]:
        """Progress messages from ``craft_pipeline_stream`` (gRPC), the last one carrying the result.

        Setting ``cancel`` stops the stream and cancels the work on the server. A stream moves
        to another endpoint only while nothing has arrived from the one it started on.
        """
        self._check_stream()
        inputs = _inputs(self.mod, build_request(prompt, **fields))
        failures: list = []
        for pause, i in self._attempts():
            time.sleep(pause)
            started = False
            try:
                for event in self._stream_once(self.clients[i], inputs, cancel):
                    started = True
                    yield event
                return
            except self._caught as exc:
                if started:
                    raise _wrap(exc, self.urls[i], self.protocol) from exc
                self._failed(exc, i, failures)
        raise self._give_up(failures) from failures[-1][2]

    def _stream_once(self, client, inputs, cancel: threading.Event | None) -> Iterator[Progress]:
        events: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: events.put((result, error)), stream_timeout=self.timeout)
        try:
            client.async_stream_infer(self.stream_model, inputs, enable_empty_final_response=False)
            while True:
                if cancel is not None and cancel.is_set():
                    return
                try:
                    result, error = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if error is not None:
                    raise error
                event = _event(result)
                yield event
                if event.result is not None:
                    return
        finally:
            client.stop_stream(cancel_requests=cancel is not None and cancel.is_set())

    def catalog(self) -> dict:
        """The served LoRAs, pairs, defaults and limits."""
        outputs = self._outputs(["catalog"])
        return _catalog(self._call(lambda c: c.infer(CATALOG_MODEL, [], outputs=outputs, **self._call_timeout())))

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> "CraftClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncCraftClient(_Base):
    """asyncio client over ``tritonclient.grpc.aio`` / ``tritonclient.http.aio``: the same methods as
    :class:`CraftClient`, awaited (``stream`` is an async iterator)."""

    def __init__(self, url: str | Sequence[str], protocol: str = "grpc", *, model: str = PIPELINE_MODEL,
                 stream_model: str = STREAM_MODEL, timeout: float | None = None, retry: RetryPolicy | None = None):
        super().__init__(url, protocol, model, stream_model, timeout, aio=True, retry=retry)

    async def ready(self) -> bool:
        """True when at least one endpoint is ready to serve the pipeline."""
        for client in self.clients:
            try:
                if await client.is_server_ready() and await client.is_model_ready(self.model):
                    return True
            except self._caught:
                continue
        return False

    async def generate(self, prompt: str | Sequence[str], **fields: Any) -> GenerateResult:
        """Images for one request (several prompts -> several images)."""
        inputs = _inputs(self.mod, build_request(prompt, **fields))
        return _result(await self._acall(lambda c: c.infer(self.model, inputs, **self._call_timeout())))

    async def stream(self, prompt: str | Sequence[str], *, cancel: asyncio.Event | None = None,
                     **fields: Any) -> AsyncIterator[Progress]:
        """Progress messages from ``craft_pipeline_stream`` (gRPC), the last one carrying the result.

        Setting ``cancel`` (or leaving the loop early) stops the stream and cancels the work on the server.
        """
        self._check_stream()
        inputs = _inputs(self.mod, build_request(prompt, **fields))
        failures: list = []
        for pause, i in self._attempts():
            await asyncio.sleep(pause)
            started = False
            try:
                async for event in self._stream_once(self.clients[i], inputs, cancel):
                    started = True
                    yield event
                return
            except self._caught as exc:
                if started:
                    raise _wrap(exc, self.urls[i], self.protocol) from exc
                self._failed(exc, i, failures)
        raise self._give_up(failures) from failures[-1][2]

    async def _stream_once(self, client, inputs, cancel: asyncio.Event | None) -> AsyncIterator[Progress]:
        async def requests():
            yield {"model_name": self.stream_model, "inputs": inputs}

        responses = client.stream_infer(requests(), stream_timeout=self.timeout)
        try:
            async for result, error in responses:
                if cancel is not None and cancel.is_set():
                    return
                if error is not None:
                    raise error
                event = _event(result)
                yield event
                if event.result is not None:
                    return
        finally:
            responses.cancel()  # no-op once the server has finished the request

    async def catalog(self) -> dict:
        """The served LoRAs, pairs, defaults and limits."""
        outputs = self._outputs(["catalog"])
        return _catalog(await self._acall(lambda c: c.infer(CATALOG_MODEL, [], outputs=outputs,
                                                              **self._call_timeout())))

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def __aenter__(self) -> "AsyncCraftClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
