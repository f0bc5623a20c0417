"""The quality benchmark's harness end to end (``--quick``: tiny counts, no claim about who wins)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from craft_toyworld.catalog import ASSETS
from craft_toyworld.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ASSETS / "base" / "unet").is_dir(), reason="committed toy-world assets are missing")
@pytest.mark.slow
@pytest.mark.extended
def test_quality_bench_quick_runs_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality_bench.py"), "--quick",
                           "--results", str(tmp_path), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report_file,) = tmp_path.glob("quality-quick-*.json")
    report = json.loads(report_file.read_text())
    assert report["quick"] and not report["tuning"]
    assert set(report["methods"]) == {m.name for m in METHODS}
    for name, entry in report["methods"].items():
        for key in ("content_score", "style_score", "both_correct"):
            stat = entry["all"][key]
            assert 0.0 <= stat["mean"] <= 1.0 and stat["n"] == len(report["seeds"]), (name, key)
    # same seeds for every method; trained LoRAs of all four sets and W_init exist
    assert report["seeds"] == [1000, 1001]
    assert len(list((tmp_path / "work" / "loras").glob("*/*.safetensors"))) == 4 * 2
    assert (tmp_path / "work" / "backbone" / "unet").is_dir()
    assert report_file.with_suffix(".md").read_text().count("| CRAFT-LoRA |") == 1
    assert report_file.with_suffix(".png").stat().st_size > 0
