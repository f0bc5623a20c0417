"""Resident memory of a served repository: tritonserver + every stub process (issue 14, "one process").

Builds the tiny SD 1.5 demo base with N content x M style LoRAs (random, rank 4), exports it
(``craft export --runner python``, baked or ``--lora-mode runtime``) with the ``craft`` given
(``--craft``: another checkout's venv measures "before"), starts ``craft serve`` on free loopback
ports, and sums RSS and PSS (``/proc/<pid>/smaps_rollup``) over tritonserver and its descendants:
once ready, and again after serving one request per pair (up to ``--pairs-served``).

    .venv/bin/python benchmarks/serve_memory_bench.py --contents 2 --styles 2 --label after
    .venv/bin/python benchmarks/serve_memory_bench.py --contents 10 --styles 10 --lora-mode runtime --label after
    .venv/bin/python benchmarks/serve_memory_bench.py --contents 2 --styles 2 --craft /path/main-venv/bin/craft --label before

``--new-lora`` then times "new LoRA file -> served" on the running server (issue 14): a new style
LoRA file and its recipe entry are written, ``craft export`` runs again in the same mode (runtime:
registers the factor file, no network built; baked: bakes and exports the new style's variants),
and the first request using the new LoRA is timed from the moment the file was on disk.

    .venv/bin/python benchmarks/serve_memory_bench.py --lora-mode runtime --new-lora --label newlora
    .venv/bin/python benchmarks/serve_memory_bench.py --lora-mode baked --new-lora --label newlora
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
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


def write_recipe(work: Path, contents: int, styles: int, extra: tuple[str, ...] = ()) -> Path:
    """The tiny SD 1.5 demo base with random rank-4 LoRAs (c0.., s0.., then ``extra`` styles): ``work/recipe.toml``."""
    from safetensors.torch import save_file

    from craft_export.recipe_models import load_recipe_models
    from craft_reference.demo import lora_target_modules, make_lora_state_dict, recipe_text, write_demo_assets

    demo = work / "demo" if (work / "demo").exists() else write_demo_assets(work / "demo", arches=("sd15",))
    head, tail = recipe_text("sd15", [], root=demo).split("[defaults]")
    names = [(f"c{i}", "content") for i in range(contents)] + [(f"s{i}", "style") for i in range(styles)]
    names += [(name, "style") for name in extra]
    entries, shapes = [], None
    for k, (name, kind) in enumerate(names):
        path = work / "loras" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            shapes = shapes or load_recipe_models(demo / "recipe-sd15.toml").shapes
            save_file(make_lora_state_dict(shapes, lora_target_modules(shapes), rank=4, alpha=4, seed=100 + k,
                                           fmt="peft"), str(path))
        entries.append(f'[[lora]]\nname = "{name}"\nkind = "{kind}"\npath = "{path}"\n')
    recipe = work / "recipe.toml"
    recipe.write_text(head + "\n".join(entries) + "\n[defaults]" + tail)
    return recipe


def export(craft: str, recipe: Path, repo: Path, lora_mode: str) -> dict:
    """``craft export --json`` as a subprocess (what an operator runs); its summary and wall time."""
    cmd = [craft, "export", "--recipe", str(recipe), "--out", str(repo), "--runner", "python", "--json"]
    if lora_mode == "runtime":
        cmd += ["--lora-mode", "runtime", "--max-rank", "4"]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    run = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        summary = json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):  # an older craft without --json
        summary = {}
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "summary": summary}


def build_repo(work: Path, craft: str, contents: int, styles: int, lora_mode: str) -> tuple[Path, list, float]:
    recipe = write_recipe(work, contents, styles)
    repo = work / f"repo-{lora_mode}"
    done = export(craft, recipe, repo, lora_mode)
    pairs = [(f"c{i}", f"s{j}") for i in range(contents) for j in range(styles)]
    return repo, pairs, done["wall_s"]


def _new_lora(work: Path, args, repo: Path, grpc: int) -> dict:
    """A new style LoRA while the server runs: its file (and recipe entry) written, then ``craft export``
    (same mode, a subprocess: interpreter start and imports included), then requests using it until one
    is served. Times count from the moment the file and the recipe are on disk."""
    from craft_client import CraftClient

    recipe = write_recipe(work, args.contents, args.styles, extra=("snew",))  # untimed: the "new LoRA file"
    load_before = load_average()
    t0 = time.perf_counter()
    done = export(args.craft, recipe, repo, args.lora_mode)
    exported = time.perf_counter() - t0
    with CraftClient(f"127.0.0.1:{grpc}") as c:
        c.generate("a dog <c> in style <s>", content="c0", style="snew", steps=STEPS, seed=1)
        served = time.perf_counter() - t0
        t1 = time.perf_counter()
        c.generate("a dog <c> in style <s>", content="c0", style="snew", steps=STEPS, seed=2)
        again = time.perf_counter() - t1
    summary = done["summary"]
    return {"export_s": round(exported, 2), "export_cpu_s": round(done["cpu_s"], 2),
            "export_in_process_s": summary.get("seconds"),
            "fast_path": summary.get("fast_path", False), "built": len(summary.get("built", [])),
            "first_image_after_export_s": round(served - exported, 2), "file_to_served_s": round(served, 2),
            "next_image_s": round(again, 2), "steps": STEPS, "load_average_before": load_before,
            "load_average_after": load_average(),
            "note": "craft export as a subprocess (interpreter start and imports included); the first image "
                    "includes its own generation (next_image_s: the same request again)"}


def _new_lora_md(n: dict) -> str:
    how = "registered, no network built" if n["fast_path"] else f"{n['built']} models built"
    return (f"\nNew style LoRA while serving (load average {n['load_average_before']} before, "
            f"{n['load_average_after']} after):\n\n"
            f"| step | seconds |\n|---|---|\n"
            f"| `craft export` (process; {how}) | {n['export_s']} (CPU {n.get('export_cpu_s', '?')}) |\n"
            f"| of which inside the exporter | {n['export_in_process_s']} |\n"
            f"| first image ({n['steps']} steps) with it, after the export | {n['first_image_after_export_s']} |\n"
            f"| **new file -> first image served** | **{n['file_to_served_s']}** |\n"
            f"| the same request again (generation alone) | {n['next_image_s']} |\n")


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
    from craft_serving.triton_server import interrupt, reserve_ports

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
        new_lora = _new_lora(work, args, repo, grpc) if args.new_lora else None
    finally:
        interrupt(proc, 60)
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
          + (_new_lora_md(new_lora) if new_lora else ""))
    write_report(report, RESULTS / f"{name}.json", md)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
