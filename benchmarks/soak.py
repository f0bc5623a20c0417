"""Soak: N concurrent clients of mixed traffic against a real `craft serve` for a bounded time.

Each client loops over a fixed menu of requests (pairs, content only, style only, no LoRA;
gRPC and HTTP; unary and streamed; two sizes, two step counts, three schedulers; one or two
prompts), drawn in a seeded order. Every request of the menu is first run alone, one at a
time: that is its expected image. Under load, every answer must equal it (within 1/255:
dynamic batching must not change results) and no request may fail. Resident memory of
tritonserver and of every Python-backend stub is sampled each second; growth is the last
minute's mean (or the last third of the run, when shorter) over the mean of the first minute
after warm-up (the first third, when shorter).

Without ``--url`` it exports the tiny SD 1.5 demo repository (4 LoRAs) into a temporary folder
and starts `craft serve` on it (loopback, free ports); with ``--url`` (several comma-separated
for replicas) it uses running servers, and ``--server-pid`` names the `craft serve` process
whose tree it samples.

    .venv/bin/python benchmarks/soak.py [--clients 16] [--duration 600] [--url HOST:PORT] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, git_state, load_average, machine_slug, write_report  # noqa: E402

from craft_client import CraftClient  # noqa: E402

KINDS = ("pair", "content", "style", "none")
CRAFT = str(Path(sys.executable).with_name("craft"))


@dataclass(frozen=True)
class Job:
    kind: str
    protocol: str
    stream: bool
    prompts: tuple[str, ...]
    fields: tuple[tuple[str, object], ...]

    @property
    def name(self) -> str:
        f = dict(self.fields)
        return (f"{self.kind}/{self.protocol}{'-stream' if self.stream else ''}/{f['height']}x{f['width']}/"
                f"{f['steps']}st/{f['scheduler']}/{len(self.prompts)}p")


def menu(catalog: dict, seed: int = 0, size: int = 48) -> list[Job]:
    """``size`` requests drawn (seeded) from every kind x protocol x size x steps x scheduler x prompts."""
    contents = [lo["name"] for lo in catalog["loras"] if lo["kind"] == "content"]
    styles = [lo["name"] for lo in catalog["loras"] if lo["kind"] == "style"]
    lo_px = max(catalog["engine"]["min_size"], 64)
    sizes = [(lo_px, lo_px), (lo_px, lo_px + 32)]
    product = [(k, p, s, z, st, sc, n) for k in KINDS for p, s in (("grpc", False), ("grpc", True), ("http", False))
               for z in sizes for st in (2, 3) for sc in ("euler", "dpmpp_2m", "euler_a") for n in (1, 2)]
    chosen = sorted(random.Random(seed).sample(range(len(product)), min(size, len(product))))
    chosen = sorted(set(chosen) | {next(i for i, x in enumerate(product) if x[0] == k) for k in KINDS})
    jobs = []
    for i in chosen:
        kind, protocol, stream, size_hw, steps, scheduler, n = product[i]
        c, s = contents[i % len(contents)], styles[i % len(styles)]
        if kind == "pair" and catalog.get("pairs"):
            c, s = catalog["pairs"][i % len(catalog["pairs"])]
        prompt = {"pair": "a {c} <c> in {s} style <s>", "content": "a {c} <c> on a beach",
                  "style": "a house in {s} style <s>", "none": "a house on a hill"}[kind].format(c=c, s=s)
        fields = {"seed": 1000 + i, "steps": steps, "scheduler": scheduler, "height": size_hw[0], "width": size_hw[1]}
        if kind in ("pair", "content"):
            fields["content"] = c
        if kind in ("pair", "style"):
            fields["style"] = s
        prompts = (prompt,) if n == 1 else (prompt, prompt.replace("a ", "the ", 1))
        jobs.append(Job(kind, protocol, stream, prompts, tuple(sorted(fields.items()))))
    return jobs


def run_job(client: CraftClient, job: Job) -> np.ndarray:
    fields = dict(job.fields)
    if not job.stream:
        return client.generate(list(job.prompts), **fields).images
    result = None
    for event in client.stream(list(job.prompts), **fields):
        if event.result is not None:
            result = event.result
    if result is None:
        raise RuntimeError(f"{job.name}: the stream ended without an image")
    return result.images


def process_tree_rss(pid: int) -> dict[str, float]:
    """MiB resident per process of the tree under ``pid`` (tritonserver, each stub by its model)."""
    out: dict[str, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            cmd = p.cmdline()
            exe = Path(cmd[0]).name if cmd else p.name()
            if exe == "tritonserver":
                name = "tritonserver"
            elif exe.startswith("triton_python_backend_stub") and len(cmd) > 1:
                name = "stub:" + Path(cmd[1]).parent.parent.name  # .../<model>/<version>/model.py
            elif p.pid == pid:
                name = "craft serve"
            else:
                name = exe
            out[f"{name}#{p.pid}"] = p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


@dataclass
class Soak:
    clients: CraftClient | None = None
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    failures: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def soak(urls: dict[str, list[str]], jobs: list[Job], expected: dict[Job, np.ndarray], *, clients: int,
         duration: float, server_pid: int | None, seed: int = 0) -> Soak:
    state, stop = Soak(), threading.Event()
    t0 = time.monotonic()

    def worker(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        conns = {p: CraftClient(u, p, timeout=300) for p, u in urls.items()}
        try:
            while not stop.is_set():
                job = jobs[rng.randrange(len(jobs))]
                start = time.monotonic()
                try:
                    images = run_job(conns[job.protocol], job)
                except Exception as exc:  # noqa: BLE001 - every failure is a finding
                    with state.lock:
                        state.failures.append(f"{job.name}: {exc!r}"[:500])
                    continue
                elapsed = time.monotonic() - start
                diff = int(np.abs(images.astype(int) - expected[job].astype(int)).max()) \
                    if images.shape == expected[job].shape else 255
                with state.lock:
                    state.latencies[job.kind].append(elapsed)
                    state.done += 1
                    if diff > 1:
                        state.mismatches.append(f"{job.name}: max diff {diff}/255")
        finally:
            for c in conns.values():
                c.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    while time.monotonic() - t0 < duration:
        if server_pid is not None:
            state.samples.append((time.monotonic() - t0, process_tree_rss(server_pid)))
        time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(600)
    return state


def memory_growth(samples: list[tuple[float, dict[str, float]]], duration: float) -> dict[str, dict[str, float]]:
    """Per process: mean MiB early (after warm-up) and late in the run, and their difference."""
    window = min(60.0, duration / 3)
    out: dict[str, dict[str, float]] = {}
    names = {n for _, s in samples for n in s}
    for name in sorted(names):
        early = [s[name] for t, s in samples if name in s and window <= t < 2 * window]
        late = [s[name] for t, s in samples if name in s and t >= duration - window]
        if early and late:
            out[name] = {"early_mib": round(statistics.mean(early), 1), "late_mib": round(statistics.mean(late), 1),
                         "growth_mib": round(statistics.mean(late) - statistics.mean(early), 1)}
    return out


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def start_server(work: Path) -> tuple[subprocess.Popen, str, str]:
    from craft_export.exporter import ExportOptions, export_repository
    from craft_reference.demo import recipe_text, write_demo_assets
    from craft_serving.triton_server import reserve_ports

    assets = write_demo_assets(work / "assets", arches=("sd15",))
    recipe = work / "recipe.toml"
    recipe.write_text(recipe_text("sd15", root=assets))
    export_repository(ExportOptions(recipe=recipe, out=work / "repo", runner="python"))
    http, grpc, metrics = reserve_ports(3)
    proc = subprocess.Popen([CRAFT, "serve", "--repo", str(work / "repo"), "--http-port", str(http), "--grpc-port",
                             str(grpc), "--metrics-port", str(metrics), "--log-file", str(work / "server.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"127.0.0.1:{grpc}"
    with CraftClient(url, timeout=10) as client:
        deadline = time.monotonic() + 300
        while not client.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"craft serve did not come up: {(work / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    return proc, url, f"127.0.0.1:{http}"


def run(urls: list[str], *, clients: int, duration: float, server_pid: int | None, seed: int = 0,
        menu_size: int = 48, http_urls: list[str] | None = None) -> dict:
    """Baselines, then the soak; returns the report (``ok`` says whether every check held).

    ``urls``: gRPC endpoints; ``http_urls``: the same servers' HTTP endpoints (without them the
    menu has no HTTP requests).
    """
    endpoints = {"grpc": urls, **({"http": http_urls} if http_urls else {})}
    with CraftClient(urls, timeout=300) as client:
        jobs = [j for j in menu(client.catalog(), seed, menu_size) if j.protocol in endpoints]
    expected = {}
    base = {p: CraftClient(u, p, timeout=300) for p, u in endpoints.items()}
    for job in jobs:  # each alone: the images every later answer must equal
        expected[job] = run_job(base[job.protocol], job)
    for c in base.values():
        c.close()
    state = soak(endpoints, jobs, expected, clients=clients, duration=duration, server_pid=server_pid, seed=seed)
    growth = memory_growth(state.samples, duration)
    return {
        "clients": clients, "duration_s": duration, "menu": len(jobs), "requests": state.done,
        "failures": state.failures, "mismatches": state.mismatches,
        "latency_ms": {k: {"n": len(v), "p50": round(1000 * _percentile(v, 0.5), 1),
                           "p99": round(1000 * _percentile(v, 0.99), 1)} for k, v in state.latencies.items()},
        "memory": growth, "max_growth_mib": max((g["growth_mib"] for g in growth.values()), default=None),
        "ok": not state.failures and not state.mismatches and state.done > 0,
    }


def markdown(report: dict) -> str:
    lines = [f"{report['clients']} clients, {report['duration_s']:.0f} s, {report['requests']} requests "
             f"({report['menu']} distinct), {len(report['failures'])} failed, "
             f"{len(report['mismatches'])} differing from their solo image", "",
             "| kind | requests | p50 | p99 |", "|---|---:|---:|---:|"]
    for kind, lat in report["latency_ms"].items():
        lines.append(f"| {kind} | {lat['n']} | {lat['p50']} ms | {lat['p99']} ms |")
    if report["memory"]:
        lines += ["", "| process | RSS early | RSS late | growth |", "|---|---:|---:|---:|"]
        for name, m in report["memory"].items():
            lines.append(f"| {name} | {m['early_mib']} MiB | {m['late_mib']} MiB | {m['growth_mib']:+} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load after the baselines")
    p.add_argument("--url", help="running server(s), gRPC HOST:PORT[,HOST:PORT...] (default: start one)")
    p.add_argument("--http-url", help="with --url: the same servers' HTTP HOST:PORT[,...] (default: no HTTP requests)")
    p.add_argument("--server-pid", type=int, help="with --url: the craft serve process to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--menu", type=int, default=48, help="distinct requests drawn from the mix")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0:
        p.error(f"--clients and --duration must be positive, got {args.clients}, {args.duration}")
    with tempfile.TemporaryDirectory(prefix="craft-soak-") as tmp:
        proc = None
        if args.url:
            urls, pid = args.url.split(","), args.server_pid
            http_urls = args.http_url.split(",") if args.http_url else None
        else:
            proc, url, http_url = start_server(Path(tmp))
            urls, http_urls, pid = [url], [http_url], proc.pid
        try:
            t0 = time.time()
            report = run(urls, clients=args.clients, duration=args.duration, server_pid=pid, seed=args.seed,
                         menu_size=args.menu, http_urls=http_urls)
        finally:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(120)
    report.update(machine=machine_slug(), load_average=load_average(), git=git_state(),
                  wall_s=round(time.time() - t0, 1))
    write_report(report, args.out / f"soak-{machine_slug()}-{time.strftime('%Y-%m-%d')}.json", markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
