"""The runtime-LoRA side of ``craft export --lora-mode runtime``: layout, example inputs, factor files.

A runtime repository holds, besides the text encoder(s), the VAE decoder and the baked W_init UNet
(``unet_base``: the unconditional branch, and the source of any hot pairs baked with ``--pairs``),
one runtime-LoRA UNet network (:mod:`.runtime_network`) in ``unet_lora/1/model.onnx`` with its
layout (``unet_lora/layout.json``: modules, max rank) and every UNet module's weight shape
(``unet_lora/module_shapes.json``: LoRAs are parsed without loading the base), and one small
factor file per LoRA in ``unet_lora/loras/<name>-<key>.safetensors`` (A and B of each routed
module, fp32, unpadded, ``alpha / rank`` folded into B). Registering a LoRA writes its factor file
and swaps the manifest (:mod:`.lora_register`): no network is rebuilt.

Max rank: ``--max-rank`` (default 64, the paper's rank) is the width every factor is zero-padded
to inside the network's banks; a LoRA of a higher rank is refused naming its rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from craft_ops.lazy import torch  # registering a LoRA (factor files, layout files) runs without torch
from craft_ops.lora import LoraAdapter
from craft_ops.routing import Routing
from craft_ops.runtime_lora import RUNTIME_TARGETS, RuntimeLayout, runtime_factors, runtime_layout

from .plan import FORMAT_VERSION, stable_hash
from .specs import NetworkSpec

__all__ = ["RUNTIME_MODEL", "LORA_FOLDER", "LAYOUT_FILE", "SHAPES_FILE", "layout_for", "runtime_examples",
           "factors_key", "write_factors", "read_factors", "write_layout_files", "read_layout_files",
           "runtime_record", "lora_factor_record"]

RUNTIME_MODEL = "unet_lora"  # the runtime network's folder (network kind too)
LORA_FOLDER = f"{RUNTIME_MODEL}/loras"
LAYOUT_FILE = "layout.json"
SHAPES_FILE = "module_shapes.json"


def layout_for(shapes: Mapping[str, tuple[int, ...]], routing: Routing, max_rank: int) -> RuntimeLayout:
    return runtime_layout(shapes, routing, max_rank=max_rank, targets=RUNTIME_TARGETS)


def runtime_examples(spec: NetworkSpec, hw: tuple[int, int], batch: int, slots: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded inputs of the runtime network: UNet inputs as :func:`example_inputs`, banks with random
    factors in slots 1.. (slot 0 zero), random slot per sample and gates in [0, 1]."""
    from .onnx_export import example_inputs
    from .runtime_network import RUNTIME_INPUTS, make_banks

    unet_inputs = tuple(t for t in spec.inputs if t.name not in RUNTIME_INPUTS and not t.name.startswith("lora_"))
    unet_spec = NetworkSpec("unet", spec.arch, unet_inputs, spec.outputs, max_batch=spec.max_batch,
                            latent_scale=spec.latent_scale, meta=spec.meta)
    out = example_inputs(unet_spec, hw=hw, batch=batch, seed=seed)
    layout = RuntimeLayout.from_json(spec.meta["runtime_layout"])
    g = torch.Generator("cpu").manual_seed(seed + 1)
    factors = {}
    for slot in range(1, slots):
        rank = int(torch.randint(1, layout.max_rank + 1, (1,), generator=g))
        factors[slot] = {m.name: (torch.randn(rank, m.fan_in, generator=g) / m.fan_in ** 0.5,
                                  torch.randn(m.d_out, rank, generator=g) * 0.5 / rank ** 0.5) for m in layout.modules}
    out.update(make_banks(layout, factors, slots))
    for kind in ("content", "style"):
        out[f"{kind}_index"] = torch.randint(0, slots, (batch,), generator=g)
        out[f"{kind}_scale"] = torch.rand(batch, generator=g)
    return out


def factors_key(sha256: str, kind: str, routing: Routing, layout: RuntimeLayout) -> str:
    """Content key of a LoRA's factor file: the LoRA file, its layer set and the network layout."""
    return stable_hash({"v": FORMAT_VERSION, "lora": sha256, "kind": kind, "routing": routing.as_dict(),
                        "layout": stable_hash(layout.to_json())})


def write_factors(folder: Path, name: str, key: str, kind: str, rank: int, factors: Mapping[str, tuple[Any, Any]]) -> str:
    """Write ``folder/<name>-<key16>.safetensors`` unless it is there (atomically); returns its file name.

    ``factors``: module -> (A, B), torch tensors or numpy arrays (the file is the same either way).
    """
    file = f"{name}-{key[:16]}.safetensors"
    path = folder / file
    if path.is_file():
        return file
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"{module}.A"], tensors[f"{module}.B"] = A, B
    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(t) for k, t in tensors.items()}
    else:
        from safetensors.torch import save_file

        tensors = {k: t.contiguous() for k, t in tensors.items()}
    tmp = path.with_name(f".{file}.tmp")
    save_file(tensors, str(tmp), metadata={"craft.name": name, "craft.kind": kind, "craft.key": key,
                                           "craft.rank": str(rank)})
    os.chmod(tmp, 0o644)  # as the rest of the repository (a server may run as another user)
    os.replace(tmp, path)
    return file


def read_factors(path: Path) -> tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(kind, {module: (A, B)}) from a factor file written by :func:`write_factors`."""
    from safetensors import safe_open

    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        kind = (f.metadata() or {}).get("craft.kind", "")
        for key in f.keys():
            module, _, part = key.rpartition(".")
            parts.setdefault(module, {})[part] = f.get_tensor(key)
    return kind, {m: (p["A"], p["B"]) for m, p in parts.items()}


def write_layout_files(folder: Path, layout: RuntimeLayout, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """``layout.json`` and ``module_shapes.json``; each replaced atomically (a live runner may read them)."""
    for name, body in ((LAYOUT_FILE, layout.to_json()), (SHAPES_FILE, {k: list(v) for k, v in sorted(shapes.items())})):
        text = json.dumps(body)
        path = folder / name
        if path.is_file() and path.read_text() == text:
            continue
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)


def read_layout_files(folder: Path) -> tuple[RuntimeLayout, dict[str, tuple[int, ...]]]:
    layout = RuntimeLayout.from_json(json.loads((folder / LAYOUT_FILE).read_text()))
    shapes = {k: tuple(v) for k, v in json.loads((folder / SHAPES_FILE).read_text()).items()}
    return layout, shapes


def lora_factor_record(adapter: LoraAdapter, kind: str, sha256: str, routing: Routing, layout: RuntimeLayout,
                       folder: Path) -> dict[str, str]:
    """Check a LoRA against the runtime network (refusals name it), write its factor file into
    ``folder`` (``unet_lora/loras`` of the repository or of the staging copy); the manifest fields."""
    factors = runtime_factors(adapter, kind, routing, layout)
    key = factors_key(sha256, kind, routing, layout)
    file = write_factors(folder, adapter.name, key, kind, adapter.rank, factors)
    return {"factors": f"{LORA_FOLDER}/{file}", "factors_key": key}


def runtime_record(layout: RuntimeLayout, fingerprint: str) -> dict:
    """The manifest's ``runtime_lora`` section."""
    return {"model": RUNTIME_MODEL, "onnx": f"{RUNTIME_MODEL}/1/model.onnx", "max_rank": layout.max_rank,
            "targets": list(RUNTIME_TARGETS), "modules": len(layout.modules),
            "slot_bytes": {k: layout.slot_floats(k) * 4 for k in ("content", "style")},
            "layout": f"{RUNTIME_MODEL}/{LAYOUT_FILE}", "module_shapes": f"{RUNTIME_MODEL}/{SHAPES_FILE}",
            "fingerprint": fingerprint}
