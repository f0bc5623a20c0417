"""Resident memory of a served repository: tritonserver + every stub process (issue 14, "one process").

Builds the tiny SD 1.5 demo base with N content x M style LoRAs (random, rank 4), exports it
(``craft export --runner python``, baked or ``--lora-mode runtime``) with the ``craft`` given
(``--craft``: another checkout's venv measures "before"), starts ``craft serve`` on free loopback
ports, and sums RSS and PSS (``/proc/<pid>/smaps_rollup``) over tritonserver and its descendants:
once ready, and again after serving one request per pair (up to ``--pairs-served``).

    .venv/bin/python benchmarks/serve_memory_bench.py --contents 2 --styles 2 --label after
    .venv/bin/python benchmarks/serve_memory_bench.py --contents 10 --styles 10 --lora-mode runtime --label after
    .venv/bin/python benchmarks/serve_memory_bench.py --contents 2 --styles 2 --craft /path/main-venv/bin/craft --label before
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, git_state, load_average, machine_slug, write_report  # noqa: E402

STEPS = 2


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory(serve_pid: int) -> dict:
    """RSS and PSS (MiB) summed over craft serve's tritonserver and its stubs (craft serve itself excluded)."""
    rss = pss = 0
    procs = 0
    for pid in descendants(serve_pid):
        if pid == serve_pid:
            continue
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:] if line.endswith("kB")}
        rss += fields.get("Rss", 0)
        pss += fields.get("Pss", 0)
        procs += 1
    return {"processes": procs, "rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1)}


def build_repo(work: Path, craft: str, contents: int, styles: int, lora_mode: str,
               extra: tuple[str, ...] = ()) -> tuple[Path, list, float]:
    from safetensors.torch import save_file

    from craft_export.recipe_models import load_recipe_models
    from craft_reference.demo import lora_target_modules, make_lora_state_dict, recipe_text, write_demo_assets

    demo = work / "demo" if (work / "demo").exists() else write_demo_assets(work / "demo", arches=("sd15",))
    shapes = load_recipe_models(demo / "recipe-sd15.toml").shapes
    head, tail = recipe_text("sd15", [], root=demo).split("[defaults]")
    names = [(f"c{i}", "content") for i in range(contents)] + [(f"s{i}", "style") for i in range(styles)]
    names += [(name, "style") for name in extra]
    entries = []
    for k, (name, kind) in enumerate(names):
        path = work / "loras" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            save_file(make_lora_state_dict(shapes, lora_target_modules(shapes), rank=4, alpha=4, seed=100 + k,
                                           fmt="peft"), str(path))
        entries.append(f'[[lora]]\nname = "{name}"\nkind = "{kind}"\npath = "{path}"\n')
    recipe = work / "recipe.toml"
    recipe.write_text(head + "\n".join(entries) + "\n[defaults]" + tail)
    repo = work / f"repo-{lora_mode}"
    t0 = time.perf_counter()
    cmd = [craft, "export", "--recipe", str(recipe), "--out", str(repo), "--runner", "python"]
    if lora_mode == "runtime":
        cmd += ["--lora-mode", "runtime", "--max-rank", "4"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    pairs = [(f"c{i}", f"s{j}") for i in range(contents) for j in range(styles)]
    return repo, pairs, time.perf_counter() - t0


def _new_lora(work: Path, args, grpc: int) -> dict:
    """A new style LoRA while the server runs: ``craft export`` (same mode) until its first image is served."""
    from craft_client import CraftClient

    t0 = time.perf_counter()
    build_repo(work, args.craft, args.contents, args.styles, args.lora_mode, extra=("snew",))
    exported = time.perf_counter() - t0
    with CraftClient(f"127.0.0.1:{grpc}") as c:
        c.generate("a dog <c> in style <s>", content="c0", style="snew", steps=STEPS, seed=1)
    return {"export_s": round(exported, 2), "file_to_served_s": round(time.perf_counter() - t0, 2),
            "steps": STEPS, "note": "craft export as a subprocess (Python + torch imports included)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contents", type=int, default=2)
    parser.add_argument("--styles", type=int, default=2)
    parser.add_argument("--lora-mode", choices=("baked", "runtime"), default="baked")
    parser.add_argument("--craft", default=str(Path(sys.executable).with_name("craft")))
    parser.add_argument("--label", default="after", help="before (main: a model per variant) / after")
    parser.add_argument("--pairs-served", type=int, default=4, help="requests (one per pair) before the 2nd sample")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--new-lora", action="store_true",
                        help="then add a style LoRA, craft export again, and time new file -> first image served")
    args = parser.parse_args()
    from craft_client import CraftClient
    from craft_serving.triton_server import reserve_ports

    work = args.work or Path(tempfile.mkdtemp(prefix="memb-"))
    repo, pairs, export_s = build_repo(work, args.craft, args.contents, args.styles, args.lora_mode)
    http, grpc, metrics = reserve_ports(3)
    proc = subprocess.Popen([args.craft, "serve", "--repo", str(repo), "--http-port", str(http), "--grpc-port",
                             str(grpc), "--metrics-port", str(metrics), "--log-file", str(work / "serve.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = CraftClient(f"127.0.0.1:{http}", "http")
    t0 = time.perf_counter()
    try:
        while not client.ready():
            if proc.poll() is not None or time.perf_counter() - t0 > 1800:
                raise SystemExit(f"craft serve did not become ready; see {work / 'serve.log'}")
            time.sleep(1)
        ready_s = time.perf_counter() - t0
        time.sleep(5)
        idle = memory(proc.pid)
        served = pairs[: args.pairs_served]
        with CraftClient(f"127.0.0.1:{grpc}") as c:
            for content, style in served:
                c.generate("a dog <c> in style <s>", content=content, style=style, steps=STEPS, seed=1)
        busy = memory(proc.pid)
        new_lora = _new_lora(work, args, grpc) if args.new_lora else None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    manifest = json.loads((repo / "manifest.json").read_text())
    repo_bytes = sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())
    report = {"label": args.label, "contents": args.contents, "styles": args.styles, "lora_mode": args.lora_mode,
              "unet_folders": len({v["model"] for v in manifest["variants"]}),
              "unet_model": manifest["networks"].get("unet"), "export_s": round(export_s, 1),
              "ready_s": round(ready_s, 1), "idle": idle, "new_lora": new_lora, "after_requests": busy,
              "pairs_served": len(served), "disk": {"repo_mib": round(repo_bytes / 2**20, 1)},
              "craft": args.craft, "load_average": load_average(), "git": git_state(),
              "date": datetime.date.today().isoformat()}
    name = f"serve-memory-{args.label}-{args.lora_mode}-{args.contents}x{args.styles}-{machine_slug()}"
    md = (f"# Served memory: {args.contents} x {args.styles} tiny SD 1.5, {args.lora_mode}, {args.label}\n\n"
          f"| state | processes | RSS MiB | PSS MiB |\n|---|---|---|---|\n"
          f"| ready | {idle['processes']} | {idle['rss_mib']} | {idle['pss_mib']} |\n"
          f"| after {len(served)} pairs | {busy['processes']} | {busy['rss_mib']} | {busy['pss_mib']} |\n\n"
          f"UNet weight folders: {report['unet_folders']}; one UNet model: {report['unet_model'] or 'no'}; "
          f"repository {report['disk']['repo_mib']} MiB on disk; export {report['export_s']} s; "
          f"ready after {report['ready_s']} s; load average {report['load_average']}.\n"
          + (f"\nNew style LoRA while serving: craft export {new_lora['export_s']} s, first image ({STEPS} steps) "
             f"served {new_lora['file_to_served_s']} s after the new file was written.\n" if new_lora else ""))
    write_report(report, RESULTS / f"{name}.json", md)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
