"""Memory while fuzzing: the same seeded hostile requests, round after round, against a real `craft serve`.

Each round sends the 24 requests of ``tests/test_hostile_input.fuzz_requests(seed=31)`` (random
dtypes, shapes, NaN/inf, huge and non-UTF-8 strings, thousands of prompts, unknown inputs; steps
pinned to 2) raw over gRPC, one at a time. Every answer must be INVALID_ARG or an image. After each
round the resident memory of tritonserver and every stub is sampled. Bounded memory means the
per-round growth falls to noise once every process has seen every request shape; a leak keeps
growing by about the same amount every round.

    .venv/bin/python benchmarks/fuzz_memory.py [--rounds 8] [--out DIR]

Writes ``benchmarks/results/fuzz-memory-<machine>-<YYYY-MM-DD>.json`` and a ``.md`` table.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the one seeded request fuzzer, shared with the tests
from _common import RESULTS, git_state, load_average, machine_slug, write_report  # noqa: E402
from soak import process_tree_rss, start_server  # noqa: E402


def one_round(client, count: int = 24) -> dict[str, int]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from test_hostile_input import fuzz_requests, raw_input

    outcomes = {"ok": 0, "invalid": 0}
    for i, arrays in enumerate(fuzz_requests(seed=31, count=count)):
        arrays["steps"] = np.array([2], np.int32)
        inputs = [raw_input(grpcclient, n, a) for n, a in arrays.items() if a.ndim > 0]
        try:
            client.infer("craft_pipeline", inputs, client_timeout=300)
            outcomes["ok"] += 1
        except InferenceServerException as exc:
            if "INVALID_ARG" not in str(exc.status()):
                raise RuntimeError(f"request {i}: {exc.status()} {exc.message()}") from exc
            outcomes["invalid"] += 1
    return outcomes


def markdown(report: dict) -> str:
    rounds = report["rounds"]
    lines = [f"# Memory while fuzzing - {report['machine']} - {report['date']}", "",
             f"{len(rounds)} rounds of the same {report['per_round']} seeded fuzzed requests against one `craft serve` "
             f"(tiny SD 1.5 demo repository); every answer INVALID_ARG or an image; load average "
             f"{report['load_average']}.", "",
             "| round | ok | invalid | server tree RSS (MiB) | growth (MiB) |", "|---:|---:|---:|---:|---:|"]
    prev = report["ready_mib"]
    lines.append(f"| ready | | | {prev:.0f} | |")
    for r in rounds:
        lines.append(f"| {r['round']} | {r['ok']} | {r['invalid']} | {r['total_mib']:.0f} | {r['total_mib'] - prev:+.0f} |")
        prev = r["total_mib"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import tritonclient.grpc as grpcclient

    with tempfile.TemporaryDirectory(prefix="craft-fuzzmem-") as tmp:
        proc, url, _ = start_server(Path(tmp))
        try:
            client = grpcclient.InferenceServerClient(url)
            ready = sum(process_tree_rss(proc.pid).values())
            rounds = []
            for k in range(1, args.rounds + 1):
                t0 = time.perf_counter()
                outcomes = one_round(client)
                per = process_tree_rss(proc.pid)
                rounds.append({"round": k, **outcomes, "seconds": round(time.perf_counter() - t0, 1),
                               "total_mib": sum(per.values()), "processes": per})
                print(f"round {k}: {outcomes}, server tree {rounds[-1]['total_mib']:.0f} MiB", flush=True)
            if not (client.is_server_ready() and proc.poll() is None):
                raise RuntimeError("the server is not ready after the fuzz rounds")
            client.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    report = {"machine": machine_slug(), "date": time.strftime("%Y-%m-%d"), "git": git_state(),
              "load_average": load_average(), "per_round": 24, "ready_mib": ready, "rounds": rounds}
    write_report(report, args.out / f"fuzz-memory-{machine_slug()}-{time.strftime('%Y-%m-%d')}.json", markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
