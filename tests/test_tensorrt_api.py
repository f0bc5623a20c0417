"""Every TensorRT attribute the code uses exists in the pinned TensorRT (no GPU needed).

Uses are found by scanning the repository's ``.py`` files (tests/trt_api_scan.py), wherever the
TensorRT code lives. They are checked against, in order of preference:

1. the real ``tensorrt`` package at the pinned version (a GPU machine with the ``gpu`` extra, or
   ``make check-tensorrt``, which installs it from NVIDIA's index into .venv-tensorrt);
2. the pinned ``tensorrt-cu12-bindings`` wheel of the dev extra (1 MB, on PyPI) with stand-in
   native libraries: PyPI's ``tensorrt-cu12-libs`` is a stub that downloads ~1-2 GB from NVIDIA's
   index, so CI has no ``libnvinfer``. The bindings module registers every class, enum, method
   and property (with its signature) when it is imported, without calling into the libraries;
   the stand-ins only satisfy the dynamic linker (their functions are never called: an import
   that did would print "stub called" and the check would fail).

``CRAFT_REQUIRE_TENSORRT=1`` turns "cannot check" into a failure (CI sets ``CI``, same effect).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trt_api_scan import Scanner, imports_tensorrt, python_files, scan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Uses the pinned TensorRT lacks that the code guards (getattr/hasattr with a fallback), each
# with what happens. Anything missing and not listed fails; a listed use that exists fails too.
KNOWN_MISSING = {
    "tensorrt.EngineStat": "TrtSession.weights_bytes falls back to None (EngineStat is not in TensorRT 10.8)",
    "ICudaEngine.get_engine_stat": "TrtSession.weights_bytes falls back to None (no get_engine_stat in 10.8)",
}


def pinned_tensorrt() -> str:
    table = tomllib.loads((ROOT / "deploy" / "base-image.toml").read_text())
    return table["releases"][table["image"]]["tensorrt"]


def _cannot_check(reason: str):
    if os.environ.get("CRAFT_REQUIRE_TENSORRT") or os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _stub_libraries(bindings: Path, out: Path) -> Path:
    """Shared objects named like TensorRT's that define the C symbols the bindings import."""
    cc = shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc") \
        or shutil.which("cc") or shutil.which("gcc")
    nm = shutil.which("nm")
    if not cc or not nm:
        _cannot_check("building stand-in TensorRT libraries needs a C compiler and nm")
    so = next(bindings.glob("tensorrt*.so"))
    needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True).stdout \
        if shutil.which("readelf") else ""
    libs = sorted(set(re.findall(r"\[(libnv\w+\.so\.\d+)\]", needed))) or [
        "libnvinfer.so.10", "libnvonnxparser.so.10", "libnvinfer_plugin.so.10"]
    undefined = subprocess.run([nm, "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=True)
    symbols = sorted({line.split()[-1] for line in undefined.stdout.splitlines()
                      if line.split() and line.split()[0] == "U" and "@" not in line.split()[-1]
                      and not line.split()[-1].startswith(("Py", "_Py", "_Z"))})
    assert symbols, f"no TensorRT symbols found in {so}"
    source = out / "stub.c"
    source.write_text("#include <stdio.h>\n" + "".join(
        f'void *{s}(void) {{ fprintf(stderr, "stub called: {s}\\n"); return 0; }}\n' for s in symbols))
    for lib in libs:
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(out / lib), f"-Wl,-soname,{lib}", str(source)], check=True)
    return out


@pytest.fixture(scope="module")
def trt_uses(tmp_path_factory) -> dict:
    pinned = pinned_tensorrt()
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt
        except ImportError:
            tensorrt = None
        if tensorrt is not None and tensorrt.__version__ == pinned:
            return {"module": "tensorrt", "version": tensorrt.__version__,
                    "uses": [u.__dict__ for u in scan(tensorrt, ROOT)]}
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or spec.origin is None:
        _cannot_check("neither tensorrt nor the tensorrt-cu12-bindings wheel (dev extra) is installed")
    version = importlib.metadata.version("tensorrt-cu12-bindings")
    if version != pinned:
        _cannot_check(f"tensorrt-cu12-bindings {version} installed, the image pins {pinned}")
    if not sys.platform.startswith("linux"):
        _cannot_check("the TensorRT bindings are Linux shared objects")
    stubs = _stub_libraries(Path(spec.origin).parent, tmp_path_factory.mktemp("trt-stubs"))
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(stubs), os.environ.get("LD_LIBRARY_PATH")]))}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("trt_api_scan.py")), "tensorrt_bindings",
                        str(ROOT)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "stub called" not in r.stderr, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_scanned_module_is_the_pinned_tensorrt(trt_uses):
    assert trt_uses["version"] == pinned_tensorrt()


def test_every_tensorrt_attribute_the_code_uses_exists(trt_uses):
    uses = trt_uses["uses"]
    files = {str(p.relative_to(ROOT)) for p in python_files(ROOT)
             if "tensorrt" in p.read_text() and imports_tensorrt(__import__("ast").parse(p.read_text()))}
    assert files, "no file imports tensorrt"
    assert files <= {u["file"] for u in uses}, f"no use found in {files - {u['file'] for u in uses}}"
    missing = {}
    for u in uses:
        if not u["ok"]:
            missing.setdefault(u["use"], []).append(f"{u['file']}:{u['line']}")
    unexpected = {k: v for k, v in missing.items() if k not in KNOWN_MISSING}
    assert not unexpected, f"TensorRT {trt_uses['version']} lacks: {unexpected}"
    stale = set(KNOWN_MISSING) - set(missing)
    assert not stale, f"now present (or no longer used), drop from KNOWN_MISSING: {stale}"


def test_scan_follows_the_fp32_layer_constraints(trt_uses):
    """The UNet's fp32 layers (tensorrt_build.EngineBuild._keep_fp32) are reached through layers and
    tensors the network hands out; the scan must see those uses, or a renamed one would go unchecked."""
    seen = {u["use"] for u in trt_uses["uses"] if u["file"] == "export/tensorrt_build.py"}
    wanted = {"INetworkDefinition.get_layer", "INetworkDefinition.num_layers", "ILayer.name", "ILayer.num_outputs",
              "ILayer.get_output", "ITensor.dtype", "ILayer.precision", "ILayer.set_output_type",
              "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "tensorrt.float32", "tensorrt.float16"}
    assert wanted <= seen, f"not scanned: {sorted(wanted - seen)}"


def test_scanner_reports_what_a_module_lacks(tmp_path):
    """The scanner on a fake module: a TensorRT 11-like BuilderFlag without FP16 is caught, through
    a builder config typed from the method signatures, and a wrong keyword argument too."""

    class BuilderFlag:
        REFIT = 1

    class IBuilderConfig:
        def set_flag(self, flag):
            """set_flag(self: tensorrt.tensorrt.IBuilderConfig, flag: tensorrt.tensorrt.BuilderFlag) -> None"""

        def set_timing_cache(self, cache, ignore_mismatch):
            """set_timing_cache(self: tensorrt.tensorrt.IBuilderConfig, cache: object, ignore_mismatch: bool) -> bool"""

    class Builder:
        def __init__(self, logger):
            pass

        def create_builder_config(self):
            """create_builder_config(self: tensorrt.tensorrt.Builder) -> tensorrt.tensorrt.IBuilderConfig"""

    fake = type(sys)("tensorrt")
    fake.Builder, fake.BuilderFlag, fake.IBuilderConfig, fake.__version__ = Builder, BuilderFlag, IBuilderConfig, "11"
    (tmp_path / "build.py").write_text(
        "import tensorrt as trt\n\n"
        "def config(logger):\n"
        "    builder = trt.Builder(logger)\n"
        "    cfg = builder.create_builder_config()\n"
        "    cfg.set_flag(trt.BuilderFlag.FP16)\n"
        "    cfg.set_flag(trt.BuilderFlag.REFIT)\n"
        "    cfg.set_timing_cache(None, ignore_mismatch=True)\n"
        "    cfg.set_timing_cache(None, strict=True)\n"
        "    return cfg.set_memory_pool_limit\n")
    scanner = Scanner(fake)
    scanner.scan_file(tmp_path / "build.py", tmp_path)
    result = {u.use: u.ok for u in scanner.uses.values()}
    assert result["BuilderFlag.FP16"] is False and result["BuilderFlag.REFIT"] is True
    assert result["IBuilderConfig.set_flag"] is True
    assert result["IBuilderConfig.set_timing_cache(ignore_mismatch=)"] is True
    assert result["IBuilderConfig.set_timing_cache(strict=)"] is False
    assert result["IBuilderConfig.set_memory_pool_limit"] is False
