"""Several endpoints in one client: parsing, round-robin, what is retried and what is not."""

from __future__ import annotations

import socket

import pytest
from tritonclient.utils import InferenceServerException

from craft_client import CraftClient, CraftServerError, CraftConnectionError, RetryPolicy
from craft_client.endpoints import Rotation, is_unavailable, parse_endpoints


def test_parse_endpoints():
    assert parse_endpoints("a:1, b:2,a:1") == ("a:1", "b:2")
    assert parse_endpoints(["a:1", "b:2,c:3"]) == ("a:1", "b:2", "c:3")
    assert parse_endpoints("[::1]:8001") == ("[::1]:8001",)
    for bad in ("", " , ", "nohost", "h:0", "h:99999", "h:port", ":8001"):
        with pytest.raises(ValueError, match="url"):
            parse_endpoints(bad)
    with pytest.raises(ValueError, match="url"):
        parse_endpoints([8001])


def test_retry_policy_bounds_and_backoff():
    assert RetryPolicy().attempts(1) == 1 and RetryPolicy().attempts(3) == 3
    assert RetryPolicy(retries=5).attempts(2) == 6
    p = RetryPolicy(retries=5, backoff_s=0.1, max_backoff_s=0.3)
    assert [p.pause(k, 2) for k in range(6)] == [0.0, 0.0, 0.1, 0.0, 0.2, 0.0]
    assert p.pause(8, 2) == 0.3
    for bad in (-1, 101, 1.5, True):
        with pytest.raises(ValueError, match="retries"):
            RetryPolicy(retries=bad)
    with pytest.raises(ValueError, match="backoff_s"):
        RetryPolicy(backoff_s=5.0, max_backoff_s=1.0)


def test_rotation_spreads_starts():
    r = Rotation(3)
    assert [r.order(2) for _ in range(4)] == [[0, 1], [1, 2], [2, 0], [0, 1]]


def test_what_counts_as_unavailable():
    assert is_unavailable(ConnectionRefusedError()) and is_unavailable(ConnectionResetError())
    assert is_unavailable(InferenceServerException("gone", status="StatusCode.UNAVAILABLE"))
    assert is_unavailable(InferenceServerException("proxy", status="503"))
    assert not is_unavailable(InferenceServerException("steps: bad", status="StatusCode.INVALID_ARGUMENT"))
    # the pipeline model between the watchdog's unload and load: another replica can serve the call
    reloading = "Request for unknown model: 'craft_pipeline' has no available versions"
    assert is_unavailable(InferenceServerException(reloading, status="StatusCode.NOT_FOUND"))
    assert is_unavailable(InferenceServerException(reloading, status="400"))
    assert not is_unavailable(InferenceServerException("Request for unknown model: 'craft_x' is not found",
                                                       status="StatusCode.NOT_FOUND"))
    assert not is_unavailable(InferenceServerException("steps: bad", status="400"))
    assert not is_unavailable(InferenceServerException("boom", status="StatusCode.INTERNAL"))


class _Endpoint:
    """Stands in for one tritonclient connection: raises ``error`` or answers; counts calls."""

    def __init__(self, error: Exception | None = None):
        self.error, self.calls = error, 0

    def infer(self, *args, **kwargs):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return "ok"

    def close(self):
        pass


def _client(endpoints, retry=None) -> CraftClient:
    client = CraftClient([f"127.0.0.1:{9000 + i}" for i in range(len(endpoints))], retry=retry)
    client.clients = endpoints
    return client


def test_call_moves_on_from_unreachable_endpoints_only():
    down = InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE")
    eps = [_Endpoint(down), _Endpoint(down), _Endpoint()]
    client = _client(eps)
    assert [client._call(lambda c: c.infer()) for _ in range(3)] == ["ok"] * 3
    assert [e.calls for e in eps] == [1, 2, 3]  # starts 0, 1, 2 in turn; each call went on until the live one

    refused = InferenceServerException("steps: must be an integer, got 2.5", status="StatusCode.INVALID_ARGUMENT")
    eps = [_Endpoint(refused), _Endpoint()]
    client = _client(eps)
    with pytest.raises(CraftServerError, match="steps") as info:
        client._call(lambda c: c.infer())
    assert not isinstance(info.value, CraftConnectionError)
    assert [e.calls for e in eps] == [1, 0]  # a refused request is never sent again


def test_all_unreachable_is_one_clear_error():
    eps = [_Endpoint(ConnectionRefusedError(111, "Connection refused")) for _ in range(2)]
    client = _client(eps, RetryPolicy(retries=3, backoff_s=0.0))
    with pytest.raises(CraftConnectionError, match=r"could not reach a server at 127.0.0.1:9000, 127.0.0.1:9001") as info:
        client._call(lambda c: c.infer())
    assert "last of 4 attempts" in str(info.value) and info.value.endpoints == ("127.0.0.1:9000", "127.0.0.1:9001")
    assert [e.calls for e in eps] == [2, 2]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_real_closed_port_is_reported_as_unreachable(protocol):
    port = _closed_port()
    with CraftClient(f"127.0.0.1:{port}", protocol, timeout=10) as client:
        assert not client.ready()
        with pytest.raises(CraftConnectionError, match=f"127.0.0.1:{port} over {protocol}"):
            client.generate("a dog", seed=1, steps=2)
        with pytest.raises(CraftConnectionError):
            client.catalog()


def test_comma_separated_url():
    client = CraftClient("127.0.0.1:1,127.0.0.1:2")
    assert client.urls == ("127.0.0.1:1", "127.0.0.1:2") and client.url == "127.0.0.1:1,127.0.0.1:2"


def test_stall_bound_follows_the_stream_and_names_model_and_address():
    """The silence bound: none (or first_s) before the first message, then max(floor, factor x longest gap);
    only time spent waiting for the server counts as silence."""
    from craft_client import StallPolicy, StreamStalled
    from craft_client.stall import StallClock

    clock = StallClock(StallPolicy(floor_s=5.0, factor=10.0), "craft_pipeline_stream", "h:8001")
    clock.waited(300.0)
    assert clock.remaining() is None  # queueing for the first message: only the call's timeout
    clock.message(1, 50)
    assert clock.remaining() == 5.0  # no gap seen yet: the floor
    for _ in range(3):
        clock.waited(0.2)
        clock.message(clock.step + 1, 50)
    clock.waited(1.0)  # one slow step: the bound grows to 10 x 1.0 s
    clock.message(5, 50)
    assert clock.remaining() == pytest.approx(10.0)
    clock.waited(10.5)
    assert clock.remaining() < 0
    err = clock.error()
    assert isinstance(err, StreamStalled) and isinstance(err, CraftServerError) and err.status == "STALLED"
    assert "craft_pipeline_stream at h:8001" in str(err) and "after step 5 of 50" in str(err), str(err)
    assert err.silent == pytest.approx(10.5) and err.bound == pytest.approx(10.0)

    first = StallClock(StallPolicy(first_s=30.0), "m", "h:1")
    assert first.remaining() == 30.0
    first.waited(31.0)
    assert "before its first message" in str(first.error())
    assert StallClock(None, "m", "h:1").remaining() is None  # stall=None: no bound at all
    for bad in (dict(floor_s=0), dict(factor=0.5), dict(first_s=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StallPolicy(**bad)
