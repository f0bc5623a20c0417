"""The runtime-LoRA UNet of a repository without Triton: one ONNX Runtime session plus the LoRA cache.

:class:`RuntimeUNet` serves every LoRA of a ``craft export --lora-mode runtime`` repository from
one network (``unet_lora``): each batch item names its content / style LoRA and its gates
(a :class:`~craft_ops.aggregate.Variant`), the factors come from the :class:`~.lora_cache.LoraCache`
(read from the repository's factor files on first use), and items with different LoRAs run in
one batched call. ``Variant()`` (gates 0) is W_init: ACFG's unconditional branch rides in the same
call as the conditional one (Eq. 10-11 as one batch-2 call), and continuous gates in [0, 1] need
no baking.

The manifest is re-read when ``craft export`` replaced it (one ``stat`` per call), so a LoRA
registered on a running repository is served on the next call; LoRAs whose factor file changed
are dropped from the cache.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from craft_export.manifest_schema import MANIFEST
from craft_export.ort import OrtSession
from craft_export.runtime_export import read_factors, read_layout_files
from craft_ops.aggregate import Variant

from .lora_cache import LoraCache, LoraKey, slots_for_budget
from .manifest import ManifestError, inside

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CACHE_MB", "RuntimeLoraRequestError", "RuntimeUNet"]

DEFAULT_CACHE_MB = 256.0  # LoRA cache budget (fp32 padded factors); the slot count follows from it
_UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")


class RuntimeLoraRequestError(ValueError):
    """A call naming a LoRA the runtime network does not serve, or malformed per-item routes."""


def _stamp(root: Path) -> tuple[int, int]:
    st = (root / MANIFEST).stat()
    return st.st_mtime_ns, st.st_ino


class RuntimeUNet:
    """See the module docstring. ``root``: the repository; ``cache_mb``: the LoRA cache budget.

    A repository exported with ``--runtime tensorrt`` is run on its engine (``unet_lora/1/model.plan``)
    on CUDA device ``device``, the cache's banks on that device (unverified without a GPU); any other
    on ONNX Runtime with ``threads`` intra-op threads."""

    def __init__(self, root: Path, *, cache_mb: float = DEFAULT_CACHE_MB, threads: int = 0,
                 device: int | None = None):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._stamp_seen: tuple[int, int] | None = None
        self.loras: dict[str, tuple[str, str, str]] = {}  # name -> (kind, factor file, factors key)
        raw = self._read()
        section = raw.get("runtime_lora")
        if raw.get("lora_mode") != "runtime" or not isinstance(section, Mapping):
            raise ManifestError(f"{self.root / MANIFEST}: not a runtime-LoRA repository "
                                f"(lora_mode {raw.get('lora_mode')!r}); export it with --lora-mode runtime")
        self.layout, _ = read_layout_files(inside(self.root, section["model"]))
        onnx = inside(self.root, section["onnx"])
        if raw.get("runtime") == "tensorrt":  # slots_for_budget stays in the engine's range (trt_policy)
            from craft_export.trt_session import TrtSession  # GPU only

            self.session = TrtSession(onnx.with_name("model.plan"), device=device)
            bank_device = self.session.device
        else:
            self.session = OrtSession(onnx, threads=threads)
            bank_device = torch.device("cpu")
        self.cache = LoraCache(self.layout, slots_for_budget(self.layout, cache_mb), self._load, device=bank_device)
        self.refresh()

    # -- manifest ---------------------------------------------------------------------------------

    def _read(self) -> dict:
        try:
            return json.loads((self.root / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{self.root / MANIFEST}: unreadable ({exc})") from exc

    def refresh(self) -> None:
        """Re-read the LoRA list if the manifest was replaced; drop cached LoRAs it removed or changed."""
        stamp = _stamp(self.root)
        if stamp == self._stamp_seen:
            return
        try:
            raw = self._read()
        except ManifestError as exc:  # a running server keeps the last good LoRA list
            log.warning("craft: manifest rejected, the runtime LoRA list stays as it was: %s", exc)
            self._stamp_seen = stamp
            return
        loras = {r["name"]: (r["kind"], r["factors"], r["factors_key"]) for r in raw.get("loras", [])
                 if r.get("factors")}
        keep = {(n, key) for n, (_, _, key) in loras.items()}
        self.cache.drop(lambda k: k in keep)
        self.loras, self._stamp_seen = loras, stamp
        log.info("runtime LoRAs: %s", sorted(loras))

    def _load(self, key: LoraKey):
        entry = self.loras.get(key[0])
        if entry is None or entry[2] != key[1]:
            raise RuntimeLoraRequestError(f"LoRA {key[0]!r} is not served by the runtime network")
        return read_factors(inside(self.root, entry[1]))

    def _key(self, field: str, name: str | None, kind: str) -> LoraKey | None:
        if name is None:
            return None
        entry = self.loras.get(name)
        if entry is None:
            raise RuntimeLoraRequestError(f"{field}: unknown LoRA {name!r}; served: {sorted(self.loras)}")
        if entry[0] != kind:
            raise RuntimeLoraRequestError(f"{field}: {name!r} is a {entry[0]} LoRA, not a {kind} LoRA")
        return name, entry[2]

    def factors_key(self, name: str, kind: str) -> str:
        """A served LoRA's factors key (changes when it is re-registered); refuses an unknown name or kind."""
        with self._lock:
            self.refresh()
            return self._key(kind, name, kind)[1]  # type: ignore[index]

    def factors(self, name: str, kind: str) -> dict:
        """A served LoRA's unpadded factors ``{module: (A, B)}`` from its factor file."""
        with self._lock:
            self.refresh()
            key = self._key(kind, name, kind)
        file_kind, factors = self._load(key)  # type: ignore[arg-type]
        if file_kind and file_kind != kind:
            raise RuntimeLoraRequestError(f"{kind}: {name!r} is a {file_kind} LoRA, not a {kind} LoRA")
        return factors

    # -- running ----------------------------------------------------------------------------------

    def __call__(self, inputs: Mapping[str, torch.Tensor], variants: Sequence[Variant]) -> torch.Tensor:
        """``noise_pred`` (B, 4, h, w) for UNet ``inputs`` of batch B, item b on the weights of ``variants[b]``."""
        n = int(inputs["sample"].shape[0])
        if len(variants) != n:
            raise RuntimeLoraRequestError(f"variants: {len(variants)} for a batch of {n}")
        with self._lock:
            self.refresh()
            keys = [(self._key("content", v.content, "content"), self._key("style", v.style, "style"))
                    for v in variants]
            outs = [self._run(inputs, variants, keys, chunk) for chunk in self._chunks(keys)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _chunks(self, keys: Sequence[tuple[LoraKey | None, LoraKey | None]]) -> list[list[int]]:
        """Consecutive items with at most ``capacity`` distinct LoRAs of each kind per chunk."""
        chunks, seen = [[]], (set(), set())
        for b, pair in enumerate(keys):
            grow = [k is not None and k not in s for k, s in zip(pair, seen)]
            if any(g and len(s) >= self.cache.capacity for g, s in zip(grow, seen)):
                chunks.append([])
                seen = (set(), set())
            chunks[-1].append(b)
            for k, s in zip(pair, seen):
                if k is not None:
                    s.add(k)
        return chunks

    def _run(self, inputs, variants, keys, chunk: list[int]) -> torch.Tensor:
        rows = torch.tensor(chunk)
        feed = {k: inputs[k].index_select(0, rows) for k in _UNET_INPUTS if k in inputs}
        feed["content_index"] = self.cache.indices("content", [keys[b][0] for b in chunk])
        feed["style_index"] = self.cache.indices("style", [keys[b][1] for b in chunk])
        feed["content_scale"] = torch.tensor([variants[b].gamma_c for b in chunk], dtype=torch.float32)
        feed["style_scale"] = torch.tensor([variants[b].gamma_s for b in chunk], dtype=torch.float32)
        feed.update(self.cache.banks)  # the cache's own tensors: no copy on this side
        return self.session.run_torch(feed)["noise_pred"]
