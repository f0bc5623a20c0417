"""Served = reference on the trained toy world (the demo's recipe), within 1/255: its own `craft serve`.

In the extended suite (`make test-extended`, run by .ci/run): one more server start costs minutes
on a loaded 2-core machine.
"""

from __future__ import annotations


import numpy as np
import pytest

from craft_export.exporter import ExportOptions, export_repository
from craft_ops.request import GenerateRequest
from craft_serving.triton_server import interrupt
from test_serving import Served, _close, _fields, _serve

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.extended]


@pytest.fixture(scope="module")
def served_toy(tmp_path_factory):
    """The toy-world demo recipe (craft demo-assets): exported, behind its own `craft serve`."""
    from craft_toyworld.catalog import committed_craft_loras, write_toy_demo_assets

    root = tmp_path_factory.mktemp("served-toy")
    recipe = write_toy_demo_assets(root / "assets")
    repo = root / "repo-toy"
    pairs = "heart+gradient" if {"heart", "gradient"} <= set(committed_craft_loras()) else "all"  # the demo's pair only
    export_repository(ExportOptions(recipe=recipe, out=repo, runner="python", pairs=pairs))
    proc, http, grpc = _serve(repo, root / "toy.log")
    try:
        yield Served(repo, recipe, proc, http, grpc, root / "toy.log")
    finally:
        interrupt(proc)


def test_toy_world_served_matches_local(served_toy):
    """Served = the reference that `craft generate --local` runs, on the trained toy world, within 1/255."""
    from craft_reference.pipeline import ReferencePipeline
    from craft_toyworld.catalog import committed_craft_loras

    if {"heart", "gradient"} <= set(committed_craft_loras()):  # the demo request
        kw = dict(prompt="a sks object <c> in zzs style <s>", content="heart", style="gradient")
    else:  # a checkout without the LoRAs: the base alone
        kw = dict(prompt="a red circle with stripes")
    prompt = kw.pop("prompt")
    with served_toy.client() as client:
        got = client.generate(prompt, **_fields(seed=7, **kw)).images
    ref = ReferencePipeline.from_recipe(served_toy.recipe).generate(
        GenerateRequest(prompts=(prompt,), **_fields(seed=7, **kw)))
    assert got.shape == (1, 64, 64, 3)
    assert _close(got, ref), f"max diff {np.abs(got.astype(int) - ref.astype(int)).max()}"
