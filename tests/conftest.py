"""Shared fixtures: the tiny demo assets are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    if os.environ.get("CRAFT_REQUIRE_GPU") == "1":  # `make test-gpu`: a skipped GPU test would pass unseen
        raise pytest.UsageError("CRAFT_REQUIRE_GPU=1 but torch sees no CUDA device")
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from craft_reference.demo import write_demo_assets

    return write_demo_assets(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def ref_pipes(demo_dir):
    """Reference pipelines of both tiny architectures, from the demo recipes."""
    from craft_export.recipe import load_recipe
    from craft_reference.pipeline import ReferencePipeline

    return {arch: ReferencePipeline.from_recipe(load_recipe(demo_dir / f"recipe-{arch}.toml"))
            for arch in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two OpenMP threads on a shared 2-core machine stall on every barrier; one is steady."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
