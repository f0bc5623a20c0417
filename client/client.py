"""``CraftClient``: CRAFT-LoRA generation over Triton gRPC or HTTP, sync and asyncio.

    client = CraftClient("localhost:8001")                 # gRPC
    result = client.generate("a dog <c> in watercolor style <s>", content="dog", style="watercolor", seed=7)
    result.images[0]       # (H, W, 3) uint8
    result.pil()[0]        # PIL.Image

Server-side errors (an unknown LoRA, a size out of range...) raise :class:`CraftServerError`
with the server's message, which names the field and the value. A server that cannot be reached
(nothing listening, the other protocol's port, a connection cut) raises
:class:`CraftConnectionError` (a :class:`CraftServerError`) naming the address and the protocol. A stream that goes silent
far longer than its steps take raises :class:`StreamStalled` (:mod:`craft_client.stall`).
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

from .endpoints import RetryPolicy, Rotation, parse_endpoints
from .errors import CraftConnectionError, CraftServerError, StreamStalled, retryable as _retryable, wrap as _wrap
from .schema import CATALOG_MODEL, DTYPES, PIPELINE_MODEL, REQUEST_INPUTS, STREAM_MODEL
from .stall import StallClock, StallPolicy

__all__ = ["CraftServerError", "CraftConnectionError", "StreamStalled", "GenerateResult", "Progress", "CraftClient",
           "AsyncCraftClient", "build_request"]

PROTOCOLS = ("grpc", "http")


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


class _Base:
    """What both clients share: endpoints, protocol, model names, timeout, request tensors."""

    def __init__(self, url: str | Sequence[str], protocol: str, model: str, stream_model: str,
                 timeout: float | None, aio: bool, retry: RetryPolicy | None = None,
                 stall: StallPolicy | None = StallPolicy()):
        self.mod, self._exc = _modules(protocol, aio=aio)
        self.stall = stall
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
    ``stall`` bounds the silence of a stream (:mod:`craft_client.stall`; None: only ``timeout``).
    """

    def __init__(self, url: str | Sequence[str], protocol: str = "grpc", *, model: str = PIPELINE_MODEL,
                 stream_model: str = STREAM_MODEL, timeout: float | None = None, retry: RetryPolicy | None = None,
                 stall: StallPolicy | None = StallPolicy()):
        super().__init__(url, protocol, model, stream_model, timeout, aio=False, retry=retry, stall=stall)

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
        to another endpoint only while nothing has arrived from the one it started on, or when it
        stalled there (:class:`StreamStalled`; it starts over on the next one, from step 1).
        """
        self._check_stream()
        inputs = _inputs(self.mod, build_request(prompt, **fields))
        failures: list = []
        for pause, i in self._attempts():
            time.sleep(pause)
            started = False
            try:
                for event in self._stream_once(i, inputs, cancel):
                    started = True
                    yield event
                return
            except StreamStalled as exc:
                failures.append((self.urls[i], exc, None))
            except self._caught as exc:
                if started:
                    raise _wrap(exc, self.urls[i], self.protocol) from exc
                self._failed(exc, i, failures)
        raise self._give_up(failures) from failures[-1][2]

    def _stream_once(self, i: int, inputs, cancel: threading.Event | None) -> Iterator[Progress]:
        client, clock, done = self.clients[i], StallClock(self.stall, self.stream_model, self.urls[i]), False
        events: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: events.put((result, error)), stream_timeout=self.timeout)
        try:
            client.async_stream_infer(self.stream_model, inputs, enable_empty_final_response=False)
            while True:
                if cancel is not None and cancel.is_set():
                    return
                left, t = clock.remaining(), time.monotonic()
                if left is not None and left <= 0:
                    raise clock.error()
                try:
                    result, error = events.get(timeout=0.1 if left is None else min(0.1, left))
                except queue.Empty:
                    continue
                finally:
                    clock.waited(time.monotonic() - t)
                if error is not None:
                    raise error
                event = _event(result)
                clock.message(event.step, event.total)
                yield event
                if event.result is not None:
                    done = True
                    return
        finally:  # anything but the result (cancel, a stall, an error, the caller leaving): cancel on the server
            client.stop_stream(cancel_requests=not done)

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
                 stream_model: str = STREAM_MODEL, timeout: float | None = None, retry: RetryPolicy | None = None,
                 stall: StallPolicy | None = StallPolicy()):
        super().__init__(url, protocol, model, stream_model, timeout, aio=True, retry=retry, stall=stall)

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
        A stream that stalls (:class:`StreamStalled`) starts over on the next endpoint, if any.
        """
        self._check_stream()
        inputs = _inputs(self.mod, build_request(prompt, **fields))
        failures: list = []
        for pause, i in self._attempts():
            await asyncio.sleep(pause)
            started = False
            try:
                async for event in self._stream_once(i, inputs, cancel):
                    started = True
                    yield event
                return
            except StreamStalled as exc:
                failures.append((self.urls[i], exc, None))
            except self._caught as exc:
                if started:
                    raise _wrap(exc, self.urls[i], self.protocol) from exc
                self._failed(exc, i, failures)
        raise self._give_up(failures) from failures[-1][2]

    async def _stream_once(self, i: int, inputs, cancel: asyncio.Event | None) -> AsyncIterator[Progress]:
        async def requests():
            yield {"model_name": self.stream_model, "inputs": inputs}

        clock = StallClock(self.stall, self.stream_model, self.urls[i])
        responses = self.clients[i].stream_infer(requests(), stream_timeout=self.timeout)
        try:
            while True:
                left, t = clock.remaining(), time.monotonic()
                try:
                    result, error = await asyncio.wait_for(responses.__anext__(), None if left is None else max(left, 0))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    clock.waited(time.monotonic() - t)
                    raise clock.error() from None
                clock.waited(time.monotonic() - t)
                if cancel is not None and cancel.is_set():
                    return
                if error is not None:
                    raise error
                event = _event(result)
                clock.message(event.step, event.total)
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
