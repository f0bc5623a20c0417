"""What the CPU benchmarks record about the machine and the checkout they ran on."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if m:
            return m[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug() -> str:
    return f"cpu-{os.cpu_count()}c-{_slug(cpu_model())}"


def git_state() -> dict:
    """Commit and locally modified files of the checkout (the server runs the working tree's code)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--short", "--untracked-files=no"], cwd=root, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head.stdout.strip(), "modified": [line[3:] for line in status.stdout.splitlines()]}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def report_start(bench: str, tag: str = "", **fields) -> tuple[Path, dict]:
    """The result file ``results/<bench>[-<tag>]-<machine>-<date>.json`` and a report that already
    names the bench, date, machine, load average and checkout, plus ``fields``."""
    date = datetime.date.today().isoformat()
    out = RESULTS / f"{bench.replace('_', '-')}{'-' + tag if tag else ''}-{machine_slug()}-{date}.json"
    return out, {"bench": bench, "date": date, "machine": cpu_model(), "cpus": os.cpu_count(),
                 "load_average_start": load_average(), "git": git_state(), **fields}


def write_report(report: dict, out: Path, markdown: str, note: str = "") -> None:
    """``out`` (JSON) and the markdown table beside it (``.md``); prints the table and both paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print()
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}{note}")
