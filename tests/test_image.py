"""The production image's install, checked without a Docker engine.

``deploy/base-image.toml`` records the NGC Triton release the Dockerfile builds on and what it
ships (Python, CUDA, TensorRT, ONNX Runtime). These tests check that the Dockerfile and
pyproject's extras follow it, and (``slow``, needs a package index) that pip resolves the image's
whole dependency set as wheels for that release's Python and platform.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "craft-lora-serve"
TRT_PACKAGES = ("tensorrt-cu12", "tensorrt-cu12-libs", "tensorrt-cu12-bindings")


def version_table() -> dict:
    return tomllib.loads((ROOT / "deploy" / "base-image.toml").read_text())


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_base_tag() -> str:
    """The release of ``FROM nvcr.io/nvidia/tritonserver:<release>-py3``."""
    tags = re.findall(r"^FROM\s+nvcr\.io/nvidia/tritonserver:(\S+)-py3\s*$", (ROOT / "Dockerfile").read_text(), re.M)
    assert len(tags) == 1, f"expected one FROM nvcr.io/nvidia/tritonserver:<release>-py3 line, found {tags}"
    return tags[0]


def dockerfile_torch() -> tuple[str, str]:
    """(version, CUDA index tag) of the Dockerfile's ``pip install "torch==V" --index-url .../whl/cuXYZ``."""
    m = re.search(r'"torch==([^"]+)"\s+--index-url\s+https://download\.pytorch\.org/whl/(\w+)',
                  (ROOT / "Dockerfile").read_text())
    assert m, "Dockerfile: no torch==VERSION install from download.pytorch.org/whl/<cuda>"
    return m.group(1), m.group(2)


def base_release() -> dict:
    table = version_table()
    tag = dockerfile_base_tag()
    assert tag in table["releases"], f"Dockerfile base {tag!r} is not in deploy/base-image.toml"
    return table["releases"][tag]


def requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    """The project's dependencies with these extras, self-references (``craft-lora-serve[x]``) expanded."""
    project = pyproject()["project"]
    optional = project["optional-dependencies"]
    out = [Requirement(r) for r in project["dependencies"]]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"pyproject has no extra {extra!r}"
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == PROJECT:
                pending.extend(req.extras)
            else:
                out.append(req)
    return out


def names(reqs: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in reqs}


def test_dockerfile_base_is_in_the_version_table_and_is_the_chosen_image():
    assert dockerfile_base_tag() == version_table()["image"]


def test_base_python_satisfies_requires_python():
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    release = base_release()
    assert requires.contains(release["python"]), (release["python"], str(requires))
    # the previous base shows what this guards against: its Python 3.10 cannot install the package
    assert not requires.contains(version_table()["releases"]["24.10"]["python"])


def test_dockerfile_torch_is_built_for_the_base_cuda():
    release = base_release()
    torch_version, cuda_tag = dockerfile_torch()
    assert torch_version == release["torch"]
    assert cuda_tag == release["torch_cuda"] == "cu" + release["cuda"].replace(".", "")


def test_gpu_extra_pins_the_base_tensorrt_and_onnxruntime():
    release = base_release()
    gpu = {canonicalize_name(r.name): r for r in requirements(("gpu",))}
    cuda_major = release["cuda"].split(".")[0]
    for name in TRT_PACKAGES:
        assert name in gpu, f"gpu extra lacks {name}"
        assert f"-cu{cuda_major}" in name
        assert str(gpu[name].specifier) == f"=={release['tensorrt']}", (name, str(gpu[name].specifier))
    assert "tensorrt" not in gpu, "the unversioned tensorrt metapackage resolves to the newest TensorRT"
    ort = gpu["onnxruntime-gpu"].specifier
    assert str(ort) == release["onnxruntime_gpu"]
    # the Python ORT is the backend's minor release (same operator set and opset support)
    backend = Version(release["onnxruntime"])
    assert ort.contains(f"{backend.major}.{backend.minor}.0") or ort.contains(str(backend))
    assert not ort.contains(f"{backend.major}.{backend.minor + 1}.0")


def test_dev_extra_bindings_are_the_pinned_tensorrt():
    """tests/test_tensorrt_api.py checks the code against these bindings: the image's TensorRT."""
    dev = {canonicalize_name(r.name): r for r in requirements(("dev",))}
    assert str(dev["tensorrt-cu12-bindings"].specifier) == f"=={base_release()['tensorrt']}"


def test_onnxruntime_comes_from_exactly_one_extra():
    base = names(requirements())
    assert not base & {"onnxruntime", "onnxruntime-gpu"}, "ONNX Runtime belongs in the cpu or gpu extra"
    cpu_install = names(requirements(("dev", "serve")))
    assert "onnxruntime" in cpu_install and "onnxruntime-gpu" not in cpu_install
    gpu_install = names(requirements(("gpu",)))
    assert "onnxruntime-gpu" in gpu_install and "onnxruntime" not in gpu_install
    for extra in pyproject()["project"]["optional-dependencies"]:
        assert "cuda-python" not in names(requirements((extra,))), "cuda-python is never imported"


def _pip(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def package_index():
    """Skip (not fail) where no package index answers: the resolve needs one."""
    try:
        r = _pip("index", "versions", "pip", "--disable-pip-version-check", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("no package index reachable (pip index timed out)")
    if r.returncode != 0:
        pytest.skip(f"no package index reachable: {r.stderr.strip().splitlines()[-1:]}")


def _manylinux_platforms(glibc: str, arch: str = "x86_64") -> list[str]:
    """Every manylinux tag a glibc-``glibc`` machine accepts (pip does not expand --platform itself)."""
    major, minor = (int(x) for x in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    return tags + [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


@pytest.mark.slow
@pytest.mark.extended
def test_image_dependencies_resolve_for_the_base_python(package_index, tmp_path):
    """pip's resolver, as the image's pip would run, for the base's Python and glibc (~90 s, network).

    Everything resolves as binary wheels except the TensorRT shim and libs: on PyPI
    ``tensorrt-cu12`` is an sdist that only adds the ``tensorrt`` import name and
    ``tensorrt-cu12-libs`` is a stub that downloads the wheel from NVIDIA's index (the
    Dockerfile passes ``--extra-index-url https://pypi.nvidia.com``). They are checked to
    exist at the pinned version; the bindings wheel stands for them in the resolve.
    """
    release = base_release()
    py = release["python"]
    reqs = requirements(("gpu", "s3"))  # the Dockerfile's ".[gpu,s3]"
    resolvable = [str(r) for r in reqs if canonicalize_name(r.name) not in TRT_PACKAGES[:2]]
    torch_version, _ = dockerfile_torch()
    platforms = [a for p in _manylinux_platforms(release["glibc"]) for a in ("--platform", p)]
    report = tmp_path / "report.json"
    r = _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--disable-pip-version-check",
             "--only-binary=:all:", "--python-version", py, "--implementation", "cp",
             "--abi", "cp" + py.replace(".", ""), *platforms, "--target", str(tmp_path / "target"),
             "--report", str(report), f"torch=={torch_version}", *resolvable, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    installed = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    assert installed["torch"] == torch_version
    assert installed["tensorrt-cu12-bindings"] == release["tensorrt"]
    assert "onnxruntime-gpu" in installed and "onnxruntime" not in installed
    # torch's CUDA runtime is the container's CUDA minor release
    assert installed["nvidia-cuda-runtime-cu12"].startswith(release["cuda"] + "."), installed["nvidia-cuda-runtime-cu12"]
    for name in TRT_PACKAGES[:2]:
        listed = _pip("index", "versions", name, "--disable-pip-version-check", timeout=120)
        assert listed.returncode == 0, listed.stderr
        assert release["tensorrt"] in re.split(r"[\s,]+", listed.stdout), f"{name}=={release['tensorrt']} not on the index"
