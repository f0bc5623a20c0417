"""``kill -9`` of Python-backend stub processes of a running ``craft serve`` under concurrent clients
(the short no-LoRA variant is ``test_serving.py::test_killed_unet_stub_fails_inflight_fast_is_reloaded_and_readiness_is_honest``).

One server (``--max-stub-reloads 1``) for the module; the crash-loop test stops it, so it runs last.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from craft_export.exporter import ExportOptions, export_repository
from craft_serving.triton_server import interrupt
from stub_faults_util import kill_stub_under_load, stub_pid
from test_serving import STUB_BACK_BOUND_S, STUB_FAIL_BOUND_S, Served, _fields, _recipe, _serve, _wait_log

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.extended]

# both windows over every step: the dog+watercolor UNet is called at each one
PAIR = ("a dog <c> in watercolor style <s>", dict(content="dog", style="watercolor", content_window=[0.0, 1.0],
                                                 style_window=[0.0, 1.0]))
PLAIN = ("a house", {})


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stubs")
    recipe = root / "recipe-sd15.toml"
    recipe.write_text(_recipe(demo_dir, "sd15", ["dog", "watercolor"]))
    repo = root / "repo"
    export_repository(ExportOptions(recipe=recipe, out=repo, runner="python"))
    log = root / "serve.log"
    proc, http, grpc = _serve(repo, log, "--max-stub-reloads", "1")
    served = Served(repo, recipe, proc, http, grpc, log)
    try:
        yield served
    finally:
        interrupt(proc, 60)


def _solo(served, prompt: str, fields: dict) -> np.ndarray:
    with served.client() as client:
        return client.generate(prompt, **fields).images


def _assert_back(served, report, model: str) -> None:
    assert report.not_ready_at is not None and report.not_ready_at < STUB_FAIL_BOUND_S, report.readiness[:5]
    assert report.ready_again_at is not None and report.ready_again_at < STUB_BACK_BOUND_S, report.readiness[-5:]
    _wait_log(served.log, rf"craft: model {model} reloaded and ready [0-9.]+ s after its stub process died")


def test_kill_unet_runner_under_concurrent_clients(server):
    """The one UNet model (``unet``: every weight set, baked variants and W_init) dies under 2 streams on
    the dog+watercolor pair and 2 without LoRAs, all sampling: each fails fast naming it (every request
    calls it at every step, so none is unaffected); readiness is 400 until it is back; afterwards the
    same request gives the same image as before."""
    before = _solo(server, PAIR[0], _fields(**PAIR[1], seed=30))
    jobs = [(PAIR[0], _fields(**PAIR[1], seed=30 + i, steps=200), True) for i in range(2)]
    jobs += [(PLAIN[0], _fields(seed=40 + i, steps=200), True) for i in range(2)]  # in flight at the kill
    report = kill_stub_under_load(server, "unet_0_0", jobs, timeout=STUB_BACK_BOUND_S * 2)
    _assert_back(server, report, "unet")
    for out in report.outcomes:
        assert out.error is not None and "unet:" in str(out.error), out.error
        assert out.ended < STUB_FAIL_BOUND_S, out.ended
    assert np.array_equal(_solo(server, PAIR[0], _fields(**PAIR[1], seed=30)), before)


def test_kill_pipeline_stub_under_concurrent_clients(server):
    """One of craft_pipeline's 4 stubs dies with a request on each: that request fails fast naming the
    model; the other three finish with their solo images (the unload waits for them); readiness is 400
    from the kill until the model is loaded again; a request meanwhile is refused naming it."""
    plain = (PLAIN[0], _fields(seed=50, steps=2))
    before = _solo(server, *plain)
    with ThreadPoolExecutor(4) as pool:  # every instance warm, so each request is sampling at the kill
        list(pool.map(lambda i: _solo(server, PLAIN[0], _fields(seed=i, steps=1)), range(4)))
    # long enough to be in flight at the kill on an idle machine too (30 steps finished within the 2 s)
    jobs = [(PLAIN[0], _fields(seed=60 + i, steps=600), False) for i in range(4)]
    report = kill_stub_under_load(server, "craft_pipeline_0_1", jobs, probe=plain, in_flight_after=1.5,
                                  timeout=STUB_BACK_BOUND_S * 2)
    _assert_back(server, report, "craft_pipeline")
    failed = [out for out in report.outcomes if out.error is not None]
    assert len(failed) == 1, [str(out.error) for out in failed]
    assert "craft_pipeline" in str(failed[0].error) and failed[0].ended < STUB_FAIL_BOUND_S, failed[0]
    for (prompt, fields, _), out in zip(jobs, report.outcomes):
        if out.error is None:
            assert np.array_equal(out.images, _solo(server, prompt, fields))
    if report.probe.error is not None:
        assert "craft_pipeline" in str(report.probe.error), report.probe.error
    with server.client() as client:
        assert client.ready()
    assert np.array_equal(_solo(server, *plain), before)


def test_kill_stream_stub_mid_stream(server):
    """kill -9 of craft_pipeline_stream's only stub under 3 streams. Triton never ends them, so each
    client ends them: a sync and an async stream on one endpoint fail with StreamStalled naming the model
    and the address once silent for their stall bound (max(10 s, 10 x the longest gap between their
    messages)); a stream with two endpoints (two names of the same server) starts over on the other
    one and, once the watchdog has reloaded the model, finishes with the image of the same request run
    alone. A later stream succeeds."""
    from craft_client import RetryPolicy, StreamStalled

    host, port = server.grpc.rsplit(":", 1)
    failover = dict(url=[server.grpc, f"localhost:{port}"], retry=RetryPolicy(retries=100, backoff_s=0.5))
    jobs = [(PLAIN[0], _fields(seed=70, steps=600), True), (PLAIN[0], _fields(seed=71, steps=600), True, {"aio": True}),
            (PLAIN[0], _fields(seed=72, steps=30), True, failover)]
    report = kill_stub_under_load(server, "craft_pipeline_stream_0_0", jobs, timeout=STUB_BACK_BOUND_S * 2)
    _assert_back(server, report, "craft_pipeline_stream")
    for out in report.outcomes[:2]:
        err = out.error
        assert isinstance(err, StreamStalled), err
        assert f"craft_pipeline_stream at {server.grpc}" in str(err) and err.status == "STALLED", err
        assert err.bound >= 10.0 and err.silent >= err.bound, err
        assert out.ended <= err.bound + 2.0, (out.ended, str(err))  # silence counts from the last message
    assert report.outcomes[2].error is None, report.outcomes[2].error
    print(f"\nstream stub kill: stalled streams ended {[round(o.ended, 1) for o in report.outcomes[:2]]} s after the "
          f"kill (bounds {[round(o.error.bound, 1) for o in report.outcomes[:2]]} s); not ready at "
          f"{report.not_ready_at:.1f} s, ready again at {report.ready_again_at:.1f} s; the failover stream finished "
          f"{report.outcomes[2].ended:.1f} s after the kill")  # the README figures (pytest -s)
    assert np.array_equal(report.outcomes[2].images, _solo(server, PLAIN[0], _fields(seed=72, steps=30)))
    with server.client() as client:
        events = list(client.stream(PLAIN[0], **_fields(seed=73, steps=3)))
    assert [e.step for e in events if e.result is None] == [1, 2, 3]
    assert np.array_equal(events[-1].result.images, _solo(server, PLAIN[0], _fields(seed=73, steps=3)))


def test_a_model_that_keeps_dying_stops_craft_serve(server):
    """--max-stub-reloads 1: the second death of one model within 10 minutes is not reloaded; craft serve
    logs why and exits 1 (readiness and liveness fail; a supervisor's restart count shows the loop).
    The model is ``vae_decoder``: the earlier tests of this module already spent ``unet``'s one reload."""
    os.kill(stub_pid(server.proc.pid, "vae_decoder_0_0"), signal.SIGKILL)
    _wait_log(server.log, r"craft: model vae_decoder reloaded and ready", timeout=STUB_BACK_BOUND_S)
    os.kill(stub_pid(server.proc.pid, "vae_decoder_0_0"), signal.SIGKILL)
    t0 = time.monotonic()
    assert server.proc.wait(STUB_BACK_BOUND_S) == 1
    assert time.monotonic() - t0 < 60
    _wait_log(server.log, r"craft: error: vae_decoder: its stub process died 2 times within 600 s .*not reloading "
                          r"it again \(max 1; a crash loop")
    with server.client("http") as client:
        assert not client.ready()
