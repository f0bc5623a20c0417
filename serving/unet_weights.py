"""Every UNet weight set of a repository in one process, picked per sample (Triton-free; issue 14).

:class:`UNetWeights` is what the repository's one ``unet`` model runs (:mod:`.unet_model` is the
Triton glue; :mod:`craft_export.unet_runner` writes the model). It holds:

* W_init's weights once: every initializer of ``unet_base``'s graph kept in an external data file is
  read into an ``OrtValue`` that every session is given (``SessionOptions.add_initializer``), so
  ONNX Runtime neither reads it from a variant's file nor holds a copy of its own;
* a session per baked variant, opened on the first call that needs it, given W_init's values for
  every weight the variant does not change (its ``1/changed.json``): a variant costs the weights it
  changes, not a whole UNet;
* in runtime mode the runtime-LoRA network (:class:`~.runtime_unet.RuntimeUNet`, LoRA cache inside),
  and the variants it keeps being asked for merged into W_init's graph in memory
  (:class:`~.merged_unet.MergedVariants`: from a variant's second call on, baked speed), and until
  then its merged weights fed to one session of W_init's graph (:class:`~.fed_unet.FedWeights`).

A repository exported with ``--runtime tensorrt --lora-mode runtime`` is served the same way from its
engines (each folder's ``model.plan``, a :class:`~craft_export.trt_session.TrtSession` on CUDA device
``device``; a TensorRT engine holds its own weights, so nothing is shared with W_init, and no variant
is merged). That path is unverified without a GPU.

Per call, rows are routed by :class:`~.runtime_denoise.RoutedDenoiser`: rows whose weights the
repository bakes (or the runner merged) run on that session (rows sharing one session in one call),
the others on the runtime network, which W_init's rows then join. The manifest is stat'ed on every call: a re-export
is served on the next call (new variants opened then, sessions of rebuilt or retired folders
dropped after one more manifest, so a request still running on the previous one finishes).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craft_export.ort import OrtSession
from craft_export.staging import folder_key
from craft_export.unet_runner import CHANGED_FILE, SELECTORS
from craft_ops.aggregate import BASE, Variant

from .manifest import ManifestError, inside, read_manifest
from .manifest_watch import Stamp, stamp_of
from .fed_unet import DEFAULT_FED_VARIANTS
from .merged_unet import DEFAULT_IDLE_MS, DEFAULT_MERGE_AFTER, DEFAULT_MERGED_VARIANTS, MergedVariants
from .runtime_denoise import RoutedDenoiser
from .runtime_unet import DEFAULT_CACHE_MB, RuntimeUNet

log = logging.getLogger(__name__)

Session = Any  # an OrtSession, or a TrtSession on a GPU: ``run_torch`` and ``input_ranks``

__all__ = ["UNetWeights", "UNetWeightsError", "wire_variant", "split_selectors", "SELECTOR_NAMES", "shared_initializers"]


class UNetWeightsError(ValueError):
    """A call asking for weights the repository does not hold."""


def wire_variant(content: str | None, gate_c: float, style: str | None, gate_s: float) -> Variant:
    """A variant as it survives the wire: gates rounded to FP32, so baked gammas match after the trip."""
    return Variant(content or None, float(np.float32(gate_c)), style or None, float(np.float32(gate_s)))


SELECTOR_NAMES = tuple(t.name for t in SELECTORS)  # the per-row LoRA names and gates of a ``unet`` call


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def split_selectors(inputs: Mapping) -> tuple[list[Variant], dict]:
    """A ``unet`` call's inputs -> (each row's variant, the network's own inputs)."""
    variants = [wire_variant(_text(c), float(gc), _text(s), float(gs)) for c, s, gc, gs in
                zip(inputs["lora_content"], inputs["lora_style"], inputs["gate_c"], inputs["gate_s"])]
    return variants, {k: v for k, v in inputs.items() if k not in SELECTOR_NAMES}


def shared_initializers(onnx_path: Path) -> dict[str, np.ndarray]:
    """The initializers of a graph kept in external data files, as arrays (read once, one at a time)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    arrays = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        file = inside(onnx_path.parent, info["location"])
        array = np.fromfile(file, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
        arrays[tensor.name] = np.ascontiguousarray(array.reshape(tuple(tensor.dims)))
    return arrays


class UNetWeights:
    """See the module docstring. ``root``: the repository; ``threads``: ONNX Runtime intra-op threads;
    ``cache_mb``: the runtime LoRA cache budget; ``merge_after`` / ``merged_variants`` / ``merge_background`` /
    ``report`` / ``fed_variants`` / ``merge_idle_ms``: see :class:`~.merged_unet.MergedVariants` (``merged_variants=0`` and
    ``fed_variants=0``: every LoRA row on the runtime network)."""

    def __init__(self, root: Path, *, threads: int = 0, cache_mb: float = DEFAULT_CACHE_MB,
                 merge_after: int = DEFAULT_MERGE_AFTER, merged_variants: int = DEFAULT_MERGED_VARIANTS,
                 merge_background: bool = True, report: Callable[[str], None] | None = None,
                 device: int | None = None, fed_variants: int = DEFAULT_FED_VARIANTS,
                 merge_idle_ms: int = DEFAULT_IDLE_MS):
        self.root = Path(root)
        self.threads, self.device = threads, device
        self.tensorrt = False  # the first manifest's runtime, fixed for the runner's life (:meth:`refresh`)
        self.cache_mb = cache_mb
        self.merge_after, self.merged_variants, self.merge_background = merge_after, merged_variants, merge_background
        self.fed_variants, self.merge_idle_ms = fed_variants, merge_idle_ms
        self.report = report
        self.merged: MergedVariants | None = None
        self._lock = threading.Lock()
        self._stamp: Stamp | None = None
        self.folders: dict[Variant, str] = {}  # baked weights -> folder
        self._retired: dict[Variant, str] = {}  # the previous manifest's, while requests may still name them
        self.sessions: dict[str, tuple[str | None, Session]] = {}  # folder -> (its craft-key, session)
        self._calls: dict[str, object] = {}  # folder -> its denoiser callable (one object: rows on it batch)
        self._base: tuple[str | None, dict] | None = None  # (W_init folder key, name -> OrtValue)
        self._arrays: dict[str, np.ndarray] = {}  # the memory behind the OrtValues
        self.runtime: RuntimeUNet | None = None
        self._runtime_key: str | None = None
        self.denoiser = RoutedDenoiser(self._runtime_call, self._baked)
        self.refresh()

    # -- the manifest -----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the manifest if it was replaced (one ``stat`` otherwise)."""
        stamp = stamp_of(self.root)
        if stamp == self._stamp:
            return
        try:
            view = read_manifest(self.root)
            folders = {wire_variant(v.content, v.gamma_c, v.style, v.gamma_s): f for v, f in view.variants.items()}
            if BASE not in folders:
                raise ManifestError(f"{self.root}: the manifest names no W_init UNet (variant with no LoRA)")
        except ManifestError as exc:
            if self._stamp is None:  # nothing good to fall back on
                raise
            log.warning("craft: manifest rejected, the unet model keeps the last good one: %s", exc)
            self._stamp = stamp  # not re-read on every call; a replaced file is
            return
        if self._stamp is None:
            self.tensorrt = view.runtime == "tensorrt"
        keys = {f: folder_key(self.root / f) for f in set(folders.values())}
        self._retired = {v: f for v, f in self.folders.items() if f not in keys}
        live = set(keys) | set(self._retired.values())
        self.sessions = {f: s for f, s in self.sessions.items() if f in live and keys.get(f, s[0]) == s[0]}
        self._calls = {f: c for f, c in self._calls.items() if f in self.sessions}
        base_key = keys[folders[BASE]]
        if self._base is not None and self._base[0] != base_key:  # a new W_init: nothing shares the old one
            if self.merged is not None:
                self.merged.discard()
            self._base, self.sessions, self._calls, self._retired, self.merged = None, {}, {}, {}, None
        self.folders, self._stamp = folders, stamp
        self._refresh_runtime(view.runtime_model)
        log.info("UNet weights: %d baked variants, runtime network: %s", len(set(folders.values())),
                 view.runtime_model or "none")

    def _refresh_runtime(self, folder: str | None) -> None:
        key = folder_key(self.root / folder) if folder else None
        # new, or rebuilt (a new base, a new max rank): nothing merged before holds
        rebuild = folder is not None and (self.runtime is None or key != self._runtime_key or self.merged is None)
        if (folder is None or rebuild) and self.merged is not None:
            self.merged.discard()
        if folder is None:
            self.runtime, self._runtime_key, self.merged = None, None, None
        elif rebuild:
            self.runtime = RuntimeUNet(self.root, cache_mb=self.cache_mb, threads=self.threads, device=self.device)
            self._runtime_key = key
            self.merged = MergedVariants(self.root / self.folders[BASE] / "1" / "model.onnx", self.runtime.layout,
                                         self._shared_arrays, self.runtime.factors_key, self.runtime.factors,
                                         threads=self.threads, after=self.merge_after,
                                         capacity=0 if self.tensorrt else self.merged_variants,
                                         background=self.merge_background, report=self.report,
                                         fed=0 if self.tensorrt else self.fed_variants, idle_ms=self.merge_idle_ms)
        else:  # the same network: drop what a re-registered or removed LoRA merged
            self.runtime.refresh()
            self.merged.keep_only({n: entry[2] for n, entry in self.runtime.loras.items()})

    # -- sessions ---------------------------------------------------------------------------------

    def _shared(self) -> dict:
        if self._base is None:
            import onnxruntime as ort

            folder = self.folders[BASE]
            self._arrays = shared_initializers(self.root / folder / "1" / "model.onnx")
            values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self._arrays.items()}
            self._base = (folder_key(self.root / folder), values)
        return self._base[1]

    def _shared_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        values = self._shared()
        return self._arrays, values

    def session(self, folder: str) -> Session:
        """The session of a baked folder, opened on first use with W_init's weights shared (ONNX Runtime)."""
        held = self.sessions.get(folder)
        if held is not None:
            return held[1]
        if self.tensorrt:
            from craft_export.trt_session import TrtSession  # GPU only

            session = TrtSession(self.root / folder / "1" / "model.plan", device=self.device)
            self.sessions[folder] = (folder_key(self.root / folder), session)
            log.info("UNet weights: opened the engine of %s", folder)
            return session
        path = self.root / folder / "1" / "model.onnx"
        changed_file = path.parent / CHANGED_FILE
        shared = self._shared()
        if folder == self.folders.get(BASE):
            given = shared
        elif changed_file.is_file():
            changed = set(json.loads(changed_file.read_text()))
            given = {n: v for n, v in shared.items() if n not in changed}
        else:  # traced, or exported before changed.json: its own weights throughout
            given = {}
        session = OrtSession(path, threads=self.threads, initializers=given)
        self.sessions[folder] = (folder_key(self.root / folder), session)
        log.info("UNet weights: opened %s (%d of %d weights shared with W_init)", folder, len(given), len(shared))
        return session

    def _baked(self, variant: Variant):
        folder = self.folders.get(variant) or self._retired.get(variant)
        if folder is None:
            return self.merged(variant) if self.merged is not None else None
        call = self._calls.get(folder)
        if call is None:
            session = self.session(folder)
            call = self._calls[folder] = lambda inputs: session.run_torch(inputs)["noise_pred"]
        return call

    def _runtime_call(self, inputs: Mapping[str, torch.Tensor], variants: Sequence[Variant]) -> torch.Tensor:
        if self.runtime is None:
            missing = sorted({str(v) for v in variants if v not in self.folders})
            raise UNetWeightsError(f"variant: no baked UNet for {missing} and the repository has no runtime "
                                   f"network (export it with --lora-mode runtime, or bake the pair)")
        return self.runtime(inputs, variants)

    # -- running ----------------------------------------------------------------------------------

    @property
    def input_ranks(self) -> dict[str, int]:
        return self.session(self.folders[BASE]).input_ranks

    def __call__(self, inputs: Mapping[str, torch.Tensor], variants: Sequence[Variant]) -> torch.Tensor:
        """``noise_pred`` for UNet ``inputs`` of batch B, row b on the weights of ``variants[b]``."""
        with self._lock:
            self.refresh()
            merged = self.merged
            if merged is None:
                out = self.denoiser.run(inputs, variants)
            else:
                merged.touch()
                try:
                    out = self.denoiser.run(inputs, variants)
                finally:
                    merged.idle()
        return out.to(inputs["sample"].device)  # TensorRT answers on its GPU
