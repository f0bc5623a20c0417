"""The stub watchdog's decisions on a made-up /proc (no server): what counts as a crash, the reload
through model control, the broken mark the pipelines read, and giving up on a crash loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from craft_serving.shutdown import DrainGate, RunDir
from craft_serving.stub_watch import StubWatch, WatchPolicy, stubs_of

SERVER = 4242
STUB = "/opt/backends/python/triton_python_backend_stub"


class FakeProc:
    """A /proc folder with tritonserver's stub children (and one unrelated process)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.add(1, "init", ppid=0, argv=["/sbin/init"])

    def add(self, pid: int, name: str, *, ppid: int = SERVER, argv: list[str] | None = None, state: str = "S") -> None:
        folder = self.root / str(pid)
        folder.mkdir()
        (folder / "stat").write_text(f"{pid} ({name}) {state} {ppid} 1 1 0 -1\n")
        (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")

    def stub(self, pid: int, model: str, index: int = 0, state: str = "S") -> None:
        argv = [STUB, f"/repo/{model}/1/model.py", "shm", "1048576", "1048576", str(SERVER), "/lib", "336",
                f"{model}_0_{index}", "DEFAULT"]
        self.add(pid, "triton_python_b", argv=argv, state=state)

    def kill(self, pid: int) -> None:
        for f in (self.root / str(pid)).iterdir():
            f.unlink()
        (self.root / str(pid)).rmdir()


class FakeControl:
    def __init__(self, proc: FakeProc, pids: dict[str, int]):
        self.proc, self.pids, self.calls = proc, pids, []
        self.not_ready: set[str] = set()
        self.fail_load = False

    def ready(self, model: str) -> bool:
        return model not in self.not_ready

    def unload(self, model: str) -> None:
        self.calls.append(("unload", model))

    def load(self, model: str, timeout: float) -> None:
        self.calls.append(("load", model))
        if self.fail_load:
            raise RuntimeError(f"load {model}: HTTP 400 failed to load")
        self.pids[model] += 1000  # Triton starts a new stub
        self.proc.stub(self.pids[model], model)


@pytest.fixture
def world(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    pids = {"unet": 100, "craft_pipeline": 200}
    proc.stub(100, "unet")
    proc.stub(200, "craft_pipeline", 0)
    proc.stub(201, "craft_pipeline", 1)
    proc.stub(300, "text_encoder", state="Z")  # a zombie is not a live stub
    proc.add(400, "triton_python_b", ppid=9999, argv=[STUB, "/other/m/1/model.py"] + ["x"] * 7 + ["m_0_0"])
    run_dir = RunDir(tmp_path / "run")
    control = FakeControl(proc, pids)
    lines: list[str] = []
    watch = StubWatch(SERVER, control, run_dir, policy=WatchPolicy(max_reloads=2, window=600),
                      report=lines.append, proc_root=proc.root)
    return proc, control, run_dir, watch, lines


def test_stubs_of_finds_the_live_stubs_of_one_server(world):
    proc, *_ = world
    found = stubs_of(SERVER, proc.root)
    assert {(s.pid, s.model, s.instance) for s in found.values()} == {
        (100, "unet", "unet_0_0"), (200, "craft_pipeline", "craft_pipeline_0_0"),
        (201, "craft_pipeline", "craft_pipeline_0_1")}


def test_a_dead_stub_is_reloaded_and_marked_broken_meanwhile(world):
    proc, control, run_dir, watch, lines = world
    gate = DrainGate("craft_pipeline", env={"CRAFT_RUN_DIR": str(run_dir.path)})
    seen = []
    control.unload = lambda model: (seen.append(gate.broken(["text_encoder", model])), control.calls.append(("unload", model)))
    (run_dir.path / "inflight" / "unet-100").write_text("3\n")  # the dead stub's last count
    (run_dir.path / "inflight" / "craft_pipeline-200").write_text("1\n")
    proc.kill(100)
    watch.check()
    assert control.calls == [("unload", "unet"), ("load", "unet")]
    assert seen[0][0] == "unet" and "unet_0_0 (pid 100) died" in seen[0][1]
    assert run_dir.inflight() == 1  # the dead stub's stale count is gone; the live one's stays
    assert gate.broken(["unet"]) is None  # cleared once it is back
    assert "died; reloading unet (reload 1 of at most 2" in lines[0]
    assert "unet reloaded and ready" in lines[1]
    watch.check()  # the new stub is known: nothing more to do
    assert len(control.calls) == 2


def test_stubs_that_exit_on_purpose_are_not_crashes(world):
    proc, control, _, watch, lines = world
    control.not_ready.add("unet")  # being unloaded (or the server is stopping)
    proc.kill(100)
    proc.stub(210, "craft_pipeline", 0)  # a reload's new instance starts before the old one exits
    proc.kill(200)
    watch.check()
    assert control.calls == [] and lines == []


def test_one_dead_instance_reloads_its_whole_model_once(world):
    proc, control, _, watch, _ = world
    proc.kill(200)
    proc.kill(201)
    watch.check()
    assert control.calls == [("unload", "craft_pipeline"), ("load", "craft_pipeline")]


def test_a_crash_loop_is_not_masked(world):
    proc, control, run_dir, watch, lines = world
    for _ in range(2):
        proc.kill(control.pids["unet"])
        watch.check()
    assert watch.gave_up is None and control.calls.count(("load", "unet")) == 2
    proc.kill(control.pids["unet"])
    watch.check()
    assert watch.gave_up and "died 3 times within 600 s" in watch.gave_up and "not reloading it again" in watch.gave_up
    assert control.calls[-1] == ("unload", "unet") and control.calls.count(("load", "unet")) == 2
    assert lines[-1].startswith("craft: error: unet: its stub process died 3 times")
    gate = DrainGate("craft_pipeline", env={"CRAFT_RUN_DIR": str(run_dir.path)})
    assert "not reloading it again" in gate.broken(["unet"])[1]


def test_a_failed_reload_gives_up_with_the_reason(world):
    proc, control, _, watch, lines = world
    control.fail_load = True
    proc.kill(100)
    watch.check()
    assert watch.gave_up and "reload after its stub process died failed: load unet: HTTP 400" in watch.gave_up
    assert "craft serve stops" in lines[-1]


def test_policy_is_checked():
    with pytest.raises(ValueError, match="max_reloads"):
        WatchPolicy(max_reloads=-1)
    with pytest.raises(ValueError, match="poll"):
        WatchPolicy(poll=0)
