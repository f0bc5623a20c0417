"""The craft-key ledger that reloads a model a re-export rebuilt under its old name (serving/model_keys.py)."""

from __future__ import annotations

from craft_serving.model_keys import LoadedKeys


class _Triton:
    def __init__(self):
        self.loads: list[str] = []

    def load_model(self, model_name: str) -> None:
        self.loads.append(model_name)


def test_one_reload_per_rebuild_shared_by_the_instances_of_a_server(tmp_path):
    (tmp_path / "repo" / "unet_c-dog").mkdir(parents=True)
    key = tmp_path / "repo" / "unet_c-dog" / "craft-key"
    key.write_text("k1\n")
    triton = _Triton()
    a, b = (LoadedKeys(tmp_path / "repo", tmp_path / "run") for _ in range(2))  # two pipeline instances
    a.note(["unet_c-dog"])
    assert not a.reload_if_rebuilt(triton, "unet_c-dog") and not b.reload_if_rebuilt(triton, "unet_c-dog")
    key.write_text("k2\n")  # a re-export rebuilt the folder under the same name
    assert a.reload_if_rebuilt(triton, "unet_c-dog")
    assert not b.reload_if_rebuilt(triton, "unet_c-dog")  # the other instance sees it done
    assert triton.loads == ["unet_c-dog"]
    key.write_text("k3\n")
    a.loaded("unet_c-dog")  # loaded afresh (e.g. after an unload): nothing to reload
    assert not b.reload_if_rebuilt(triton, "unet_c-dog") and triton.loads == ["unet_c-dog"]


def test_without_a_run_folder_each_instance_keeps_its_own_ledger(tmp_path, monkeypatch):
    monkeypatch.delenv("CRAFT_RUN_DIR", raising=False)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "craft-key").write_text("k1\n")
    triton = _Triton()
    keys = LoadedKeys(tmp_path)
    keys.note(["m", "no-such-model"])
    (tmp_path / "m" / "craft-key").write_text("k2\n")
    assert keys.reload_if_rebuilt(triton, "m") and not keys.reload_if_rebuilt(triton, "m")
    assert not keys.reload_if_rebuilt(triton, "no-such-model")  # no craft-key: nothing to compare
    assert triton.loads == ["m"]
