"""The layout as a contract: one package per stage, imports pointing one way, no cycles, small modules.

Static checks only (``ast`` over the source files, nothing imported), so they run in well under a
second and name the offending file and import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> import name (pyproject's package-dir)
STAGES = {
    "craft_ops": "craft_ops",
    "export": "craft_export",
    "serving": "craft_serving",
    "training": "craft_training",
    "reference": "craft_reference",
    "toyworld": "craft_toyworld",
    "cli": "craft_cli",
    "client": "craft_client",
    "model_repository": "craft_model_repository",
}
# stage -> the project packages it may import (README, "Layout")
ALLOWED = {
    "craft_ops": {"craft_ops"},
    "craft_client": {"craft_client"},
    "craft_export": {"craft_export", "craft_ops", "craft_client"},
    "craft_serving": {"craft_serving", "craft_export", "craft_ops", "craft_client"},
    "craft_training": {"craft_training", "craft_export", "craft_ops"},
    "craft_reference": {"craft_reference", "craft_export", "craft_ops"},
    # the trained toy world sits on top of training and reference; only the CLI (and benchmarks) import it
    "craft_toyworld": {"craft_toyworld", "craft_training", "craft_reference", "craft_export", "craft_ops"},
    "craft_cli": set(STAGES.values()),
    "craft_model_repository": {"craft_serving"},
}
# Outside the CLI, the client package is imported only for its wire schema (and the dtype table in it).
CLIENT_SCHEMA = "craft_client.schema"
MAX_LINES = 450
ONE_FILE = "must be one file"  # a module docstring saying why lets a module pass MAX_LINES


def _modules() -> dict[str, Path]:
    """Import name -> file of every module of every stage (Triton model templates included)."""
    out = {}
    for folder, package in STAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, function-level ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(module, path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # "from pkg import submodule" imports the submodule
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return found


def _project_edges() -> dict[str, list[tuple[int, str]]]:
    """Module -> (line, project module) it imports, resolved to the longest known module name."""
    edges = {}
    for module, path in MODULES.items():
        targets = []
        for line, name in _imports(module, path):
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in MODULES:
                    targets.append((line, candidate))
                    break
        edges[module] = targets
    return edges


EDGES = _project_edges()


def _stage(module: str) -> str:
    return module.split(".")[0]


def test_every_stage_folder_is_found():
    assert {_stage(m) for m in MODULES} == set(STAGES.values())
    assert "craft_serving.runtime" in MODULES and "craft_ops.conditioning" in MODULES


def test_imports_follow_the_stage_rules():
    bad = []
    for module, targets in EDGES.items():
        stage = _stage(module)
        for line, target in targets:
            where = f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}"
            if _stage(target) not in ALLOWED[stage]:
                bad.append(f"{where} ({stage} may import {sorted(ALLOWED[stage])})")
            elif _stage(target) == "craft_client" and stage not in ("craft_client", "craft_cli") \
                    and target != CLIENT_SCHEMA:
                bad.append(f"{where} (outside the CLI only {CLIENT_SCHEMA} may be imported)")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph = {m: sorted({t for _, t in targets if t != m}) for m, targets in EDGES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_stage_imports_are_checked_on_real_code():
    # the checker itself: export really imports craft_ops, serving really imports export
    assert any(_stage(t) == "craft_ops" for m, ts in EDGES.items() if _stage(m) == "craft_export" for _, t in ts)
    assert any(_stage(t) == "craft_export" for m, ts in EDGES.items() if _stage(m) == "craft_serving" for _, t in ts)
    assert ("craft_serving.triton_model" in
            {t for m, ts in EDGES.items() if _stage(m) == "craft_model_repository" for _, t in ts})


def test_modules_stay_small():
    """No module over MAX_LINES lines outside tests and benchmarks, unless its docstring says why."""
    long = []
    for module, path in MODULES.items():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and ONE_FILE not in (ast.get_docstring(ast.parse(path.read_text())) or ""):
            long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, f"split by responsibility (limit {MAX_LINES}):\n" + "\n".join(long)


def test_pyproject_declares_every_package_and_an_spdx_license():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert isinstance(project["project"]["license"], str)  # SPDX expression, not the deprecated table
    assert setuptools["package-dir"] == {package: folder for folder, package in STAGES.items()}
    declared = set(setuptools["packages"])
    # every folder of a stage that holds files setuptools would ship must be a declared package
    for folder, package in STAGES.items():
        for sub in (ROOT / folder).rglob("*"):
            if sub.is_dir() and sub.name != "__pycache__" and sub.name.isidentifier() \
                    and any(f.is_file() for f in sub.iterdir()):
                name = ".".join([package, *sub.relative_to(ROOT / folder).parts])
                assert name in declared, f"{sub.relative_to(ROOT)} ({name}) is not in pyproject's packages"
    assert project["project"]["scripts"]["craft"] == "craft_cli:main"


def _parser():
    from craft_cli.app import build_parser

    return build_parser()


def _options(parser):
    """(subcommand, action) for every option of every subcommand."""
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                yield name, p, action


def test_every_flag_has_help_with_its_default_and_choices():
    parser = _parser()
    seen = 0
    for name, p, action in _options(parser):
        flag = f"craft {name} {action.option_strings[-1]}"
        text = p._get_formatter()._expand_help(action) if action.help else ""
        assert text.strip(), f"{flag}: no help"
        if not action.required:
            assert "default" in text, f"{flag}: help does not state the default: {text!r}"
        for choice in action.choices or ():
            assert str(choice) in text, f"{flag}: help does not list choice {choice!r}: {text!r}"
        seen += 1
    assert seen > 50
    scheduler = next(a for n, _, a in _options(parser) if n == "generate" and a.dest == "scheduler")
    from craft_ops.sampling import SCHEDULERS

    assert sorted(scheduler.choices) == sorted(SCHEDULERS)


def test_cli_version_module_and_serve_log_help():
    r = subprocess.run([sys.executable, "-m", "craft_cli", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("craft "), r.stderr
    r = subprocess.run([sys.executable, "-m", "craft_cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    help_text = " ".join(r.stdout.split())
    from craft_serving.serve import default_log_path

    assert default_log_path(Path("out/repo-sd15"), 8000) == Path("out").resolve() / "repo-sd15-tritonserver-8000.log"
    assert "<REPO>-tritonserver-<HTTP_PORT>.log in the folder that holds REPO" in help_text


def test_help_imports_no_heavy_library():
    code = ("import sys; from craft_cli.app import build_parser; build_parser();"
            "print(sorted(m for m in ('torch', 'diffusers', 'onnx', 'tritonclient') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("folder", ["export"])
def test_export_never_imports_serving_even_lazily(folder):
    offenders = [f"{MODULES[m].relative_to(ROOT)}:{line}" for m, ts in EDGES.items()
                 if MODULES[m].is_relative_to(ROOT / folder) for line, t in ts if _stage(t) == "craft_serving"]
    assert not offenders
