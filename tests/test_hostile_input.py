"""Hostile input without a server: safetensors headers, paths that escape, a seeded fuzz of the request
schema, the drain protocol of ``craft serve``, admin keys and ports."""

from __future__ import annotations

import json
import random
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from craft_client.schema import REQUEST_INPUTS
from craft_export.safe_files import UnsafeFileError, check_confined, check_safetensors, copy_tree_confined
from craft_ops.request import Defaults, Limits, LoraInfo, RequestError, plan_request
from craft_serving.runtime import request_from_arrays

# -- safetensors files written to hurt ------------------------------------------------------------------


def _safetensors(path: Path, header: dict, data: bytes = b"", declared: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    "header longer than the file": (dict(header={"a": _entry()}, data=bytes(8), declared=10**9),
                                    "larger than the file"),
    "header not JSON": (dict(header={}, data=b"", declared=None), None),  # rewritten below
    "offsets past the data": (dict(header={"a": _entry(offsets=(0, 8))}, data=bytes(4)), "outside the data"),
    "overlapping tensors": (dict(header={"a": _entry(), "b": _entry(offsets=(4, 12))}, data=bytes(12)), "overlaps"),
    "integer weight matrix": (dict(header={"a": _entry("I64", (2, 2), (0, 32))}, data=bytes(32)), "not a weight dtype"),
    "unknown dtype": (dict(header={"a": _entry("F128", (1,), (0, 16))}, data=bytes(16)), "unknown dtype"),
    "gigantic shape": (dict(header={"a": _entry("F32", (2**40, 2**40), (0, 8))}, data=bytes(8)), "needs"),
    "negative dim": (dict(header={"a": _entry("F32", (-1,), (0, 8))}, data=bytes(8)), "non-negative"),
    "metadata not strings": (dict(header={"__metadata__": {"alpha": 4}, "a": _entry()}, data=bytes(8)),
                             "__metadata__"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_safetensors_headers_are_refused_before_reading(tmp_path, case):
    kwargs, needle = HOSTILE[case]
    path = _safetensors(tmp_path / "x.safetensors", **kwargs)
    if case == "header not JSON":
        path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
        needle = "not UTF-8 JSON"
    t0 = time.perf_counter()
    with pytest.raises(UnsafeFileError, match=needle) as info:
        check_safetensors(path)
    assert str(path) in str(info.value) and time.perf_counter() - t0 < 1.0  # nothing allocated or read


def test_valid_header_passes_and_nan_values_are_refused(tmp_path):
    from safetensors.torch import save_file
    import torch

    from craft_export.loading import LoadError, read_lora_file

    path = tmp_path / "ok.safetensors"
    save_file({"a.lora_down.weight": torch.ones(2, 3), "a.alpha": torch.tensor(4)}, str(path))
    assert set(check_safetensors(path)) == {"a.lora_down.weight", "a.alpha"}
    save_file({"a.lora_down.weight": torch.tensor([[1.0, float("inf")]])}, str(path))
    with pytest.raises(LoadError, match="NaN or Inf"):
        read_lora_file(path)


# -- paths that escape --------------------------------------------------------------------------------------


def test_symlinks_and_dotdot_out_of_the_allowed_folders_are_refused(tmp_path):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    (inside / "model").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (inside / "model" / "ok.txt").write_text("fine")
    check_confined([("base.path", inside / "model")], [inside])  # a clean folder passes
    (inside / "model" / "leak.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(UnsafeFileError, match=r"base.path: .*leak.txt.*outside the allowed folders"):
        check_confined([("base.path", inside / "model")], [inside])
    with pytest.raises(UnsafeFileError, match="lora 'x'.path"):
        check_confined([("lora 'x'.path", inside / ".." / "outside" / "secret.txt")], [inside])
    # asset copies into a repository never follow a link out of their folder
    with pytest.raises(UnsafeFileError, match="outside"):
        copy_tree_confined(inside / "model", tmp_path / "copy")


# -- a seeded fuzz of the request schema -----------------------------------------------------------------

_CATALOG = {"dog": LoraInfo("dog", "content", (1.0,)), "watercolor": LoraInfo("watercolor", "style", (1.0,))}
_LIMITS = Limits(min_hw=(64, 64), max_hw=(128, 128), max_prompts=8, max_pixels=8 * 128 * 128)
_TEXTS = [b"a dog <c>", b"watercolor <s>", b"\xff\xfe\x00", b"", b" ", "\u00e9\u4e2d".encode(), b"<c><c><s>",
          b"x" * 20000, b"a <c:0.5> dog", b"dog", b"watercolor", b"nobody", b"euler", b"acfg", b"\x00" * 5]
_NUMBERS = [0, 1, -1, 4, 64, 72, 128, 4096, 2**31 - 1, -2**31, 2**62, 0.5, -0.0, float("nan"), float("inf"),
            float("-inf"), 1e30, 6.5]


def _random_array(rng: random.Random, name: str) -> np.ndarray:
    shape = rng.choice([(1,), (2,), (0,), (3, 2), (1, 1), ()])
    kind = rng.choice(["bytes", "float32", "float64", "int32", "int64", "uint8", "bool"])
    if name == "prompt" and rng.random() < 0.05:
        shape = (rng.choice([9, 1000, 5000]),)  # thousands of prompts
    n = int(np.prod(shape)) if shape else 1
    if kind == "bytes":
        values = np.array([rng.choice(_TEXTS) for _ in range(n)], dtype=np.object_)
    else:
        values = np.array([rng.choice(_NUMBERS) for _ in range(n)], dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            values = np.nan_to_num(values) if kind not in ("float32", "float64") else values
            values = values.astype(kind)
    return values.reshape(shape)


def _valid_array(rng: random.Random, name: str) -> np.ndarray:
    dtype, dims, _ = REQUEST_INPUTS[name]
    value = {"prompt": [b"a dog <c> in watercolor <s>"], "content": [b"dog"], "style": [b"watercolor"],
             "negative_prompt": [b"blurry"], "mode": [b"acfg"], "scheduler": [b"euler"], "seed": [7],
             "steps": [4], "guidance": [6.5], "height": [64], "width": [72], "gamma_c": [1.0], "gamma_s": [1.0],
             "content_window": [0.0, 0.7], "style_window": [0.3, 1.0], "preview_every": [1]}[name]
    np_dtype = {"BYTES": np.object_, "FP32": np.float32, "INT32": np.int32, "INT64": np.int64}[dtype]
    return np.array(value, dtype=np_dtype)


def raw_input(mod, name: str, arr: np.ndarray):
    """A tritonclient ``InferInput`` of ``arr`` as it is (its dtype decides the wire type)."""
    wire = {"O": "BYTES", "f": {4: "FP32", 8: "FP64"}, "i": {4: "INT32", 8: "INT64"}, "u": {1: "UINT8"}, "b": "BOOL"}
    kind = wire[arr.dtype.kind]
    inp = mod.InferInput(name, list(arr.shape), kind if isinstance(kind, str) else kind[arr.dtype.itemsize])
    inp.set_data_from_numpy(arr)
    return inp


def fuzz_requests(seed: int, count: int):
    """Valid requests with 0-4 fields replaced by random dtypes, shapes and values, or unknown inputs added."""
    rng = random.Random(seed)
    names = list(REQUEST_INPUTS)
    for _ in range(count):
        arrays = {name: _valid_array(rng, name) for name in names if name == "prompt" or rng.random() < 0.5}
        for name in rng.sample(names, rng.choice([0, 1, 1, 2, 4])):
            arrays[name] = _random_array(rng, name)
        if rng.random() < 0.05:
            arrays[rng.choice(["prompts", "x" * 300, "\u00e9", "__class__"])] = np.zeros(1, np.float32)
        yield arrays


def test_request_schema_fuzz_gives_a_plan_or_a_request_error():
    """3000 seeded random requests: every one is planned or refused with a RequestError naming a field;
    nothing else is raised, and the whole run stays within seconds (limits are checked before work)."""
    t0 = time.perf_counter()
    outcomes = {"planned": 0, "refused": 0}
    fields = set(REQUEST_INPUTS) | {"prompt"}
    for i, arrays in enumerate(fuzz_requests(seed=13, count=3000)):
        try:
            req, _ = request_from_arrays(arrays, _LIMITS)
            plan_request(req, _CATALOG, Defaults(steps=4, height=64, width=64), _LIMITS)
            outcomes["planned"] += 1
        except RequestError as exc:
            outcomes["refused"] += 1
            assert exc.field.split("[")[0] in fields or any(k.startswith(exc.field) for k in arrays), (i, str(exc))
            assert len(str(exc)) < 2000, (i, str(exc)[:200])  # huge inputs are not echoed back
        except Exception as exc:  # noqa: BLE001 - the assertion is that nothing else escapes
            pytest.fail(f"case {i}: {type(exc).__name__}: {exc} for {({k: repr(v)[:80] for k, v in arrays.items()})}")
    assert outcomes["planned"] > 100 and outcomes["refused"] > 1000, outcomes
    assert time.perf_counter() - t0 < 30


def test_limits_refuse_before_decoding():
    many = {"prompt": np.array([b"a dog"] * 5000, dtype=np.object_)}
    with pytest.raises(RequestError, match="at most 8 prompts"):
        request_from_arrays(many, _LIMITS)
    huge = {"prompt": np.array([b"\xff" * 10**6], dtype=np.object_)}
    with pytest.raises(RequestError, match="longer than 4096 characters"):
        request_from_arrays(huge, _LIMITS)
    req, _ = request_from_arrays({"prompt": np.array([b"a dog"] * 8, dtype=np.object_),
                                  "height": np.array([128], np.int32), "width": np.array([128], np.int32)}, _LIMITS)
    small = Limits(min_hw=(64, 64), max_hw=(128, 128), max_prompts=8, max_pixels=4 * 128 * 128)
    with pytest.raises(RequestError, match="pixels per request"):
        plan_request(req, _CATALOG, Defaults(steps=4, height=64, width=64), small)


# -- craft serve: drain protocol, admin key, ports ------------------------------------------------------------


def test_drain_gate_counts_and_refuses_after_drain(tmp_path):
    from craft_serving.shutdown import DrainGate, RunDir

    run = RunDir(tmp_path / "run")
    gate = DrainGate("craft_pipeline", env=run.env())
    with gate.admit() as ok:
        assert ok and run.inflight() == 1
        run.drain()
        assert run.wait_drained(0.3, poll=0.05)[0] is False  # still one in flight
        with gate.admit() as second:
            assert not second  # refused once draining
    assert run.inflight() == 0 and run.wait_drained(1.0)[0] is True
    gate.close()
    no_run = DrainGate("craft_pipeline", env={})
    with no_run.admit() as ok:
        assert ok  # tritonserver started by hand: everything admitted


def test_admin_key_sources_and_flags(tmp_path):
    from craft_serving.admin import AdminKeyError, resolve_admin_key, restricted_args

    key = resolve_admin_key(None, {"CRAFT_ADMIN_KEY": "k" * 20}, tmp_path / "key")
    assert key.source == "$CRAFT_ADMIN_KEY" and "k" * 20 not in repr(key)
    assert resolve_admin_key("f" * 20, {"CRAFT_ADMIN_KEY": "k" * 20}, tmp_path / "key").value == "f" * 20
    made = resolve_admin_key(None, {}, tmp_path / "key")
    assert made.source == "generated" and (tmp_path / "key").read_text().strip() == made.value
    assert (tmp_path / "key").stat().st_mode & 0o077 == 0
    with pytest.raises(AdminKeyError, match="--admin-key"):
        resolve_admin_key("short", {}, tmp_path / "key")
    with pytest.raises(AdminKeyError, match="CRAFT_ADMIN_KEY"):
        resolve_admin_key(None, {"CRAFT_ADMIN_KEY": "has,comma:and=" + "x" * 20}, tmp_path / "key")
    http, grpc = restricted_args("k" * 20)
    assert http.startswith("--http-restricted-api=model-repository,") and http.endswith(":admin-key=" + "k" * 20)
    assert grpc.startswith("--grpc-restricted-protocol=model-repository,")


def test_port_in_use_is_refused_naming_the_flag():
    from craft_serving.serve import ServeError, check_ports

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=f"--grpc-port: port {port} on 127.0.0.1 is already in use"):
            check_ports("127.0.0.1", {"--grpc-port": port})
    with pytest.raises(ServeError, match="--host"):
        check_ports("203.0.113.7", {"--http-port": 1})  # TEST-NET-3: never an address of this machine
