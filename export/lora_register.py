"""Registering runtime LoRAs without loading the base: the fast path of ``craft export --lora-mode runtime``.

When a runtime repository's manifest says that nothing its networks depend on has changed (the
recipe apart from its runtime LoRAs, the options, the base / backbone / hot-pair files by size and
mtime: :func:`craft_export.runtime_plan.fingerprint`), an export only has to add, update or remove
LoRAs. Each new or changed LoRA file is parsed against the module shapes stored beside the runtime
network, checked (:func:`craft_ops.runtime_lora.runtime_factors`), its factor file written, and the
manifest swapped (under the repository lock, :class:`~craft_export.staging.RepoTransaction`). No
network is loaded, traced or rebuilt; a runner re-reading the manifest serves the LoRA on its next
call.

Anything else (a changed base, recipe or option; a DoRA LoRA, which needs the base weights; a
missing layout file) returns ``None`` and the caller runs the full export.

Fast to start as well as to run: this path needs safetensors and numpy, never torch, diffusers or
ONNX (the LoRA is read as numpy arrays, parsed and checked by :mod:`craft_ops.lora` /
:mod:`craft_ops.runtime_lora`, whose torch import is lazy). ``craft export`` calls
:func:`register_fast` before it imports the exporter; ``tests/test_lora_register_imports.py`` checks
that a registration leaves torch out of ``sys.modules``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from craft_ops.lora import LoraError, parse_lora
from craft_ops.runtime_lora import RuntimeLoraError

from . import runtime_export as rt
from .lora_files import LoraFileError, metadata_alphas
from .lora_read import LoadError, read_lora_file, sha256_file
from .manifest_schema import LoraRecord
from .options import ExportError, ExportOptions, ExportReport, check_runtime
from .plan import FORMAT_VERSION, PlanError, parse_pairs
from .recipe import LoraSpec, Recipe, load_confined_recipe
from .runtime_plan import fingerprint, remove_unreferenced_factors
from .staging import RepoTransaction, existing_manifest

log = logging.getLogger(__name__)

__all__ = ["register_fast", "register_loras"]


class _NeedsFullExport(Exception):
    pass


def _record(spec: LoraSpec, recipe: Recipe, out: Path, layout, shapes, old: Mapping | None) -> tuple[LoraRecord, bool]:
    """The manifest record of one LoRA, its factor file written if new; (record, written)."""
    sha = sha256_file(spec.path)
    key = rt.factors_key(sha, spec.kind, recipe.routing, layout)
    if old and old.get("factors_key") == key and (out / old.get("factors", "")).is_file():
        return LoraRecord.from_json({**old, "path": str(spec.path), "gammas": list(spec.gammas)}), False
    try:
        tensors, metadata = read_lora_file(spec.path, framework="np")
        adapter = parse_lora(tensors, shapes, name=spec.name, alphas=metadata_alphas(metadata, shapes))
    except (LoadError, LoraError, LoraFileError) as exc:
        raise ExportError(f"{recipe.path}: lora {spec.name!r} ({spec.path}): {exc}") from exc
    if adapter.needs_base:
        raise _NeedsFullExport  # DoRA bakes against W_init: the full export loads it (and names the refusal)
    try:
        fields = rt.lora_factor_record(adapter, spec.kind, sha, recipe.routing, layout, out / rt.LORA_FOLDER)
    except RuntimeLoraError as exc:
        raise ExportError(f"{recipe.path}: lora {spec.name!r} ({spec.path}): {exc}") from exc
    modules = list(adapter.modules)
    coverage = {"modules": len(modules), "content": len(recipe.routing.select("content", modules)),
                "style": len(recipe.routing.select("style", modules)),
                "routed": len(recipe.routing.select(spec.kind, modules))}
    record = LoraRecord(spec.name, spec.kind, spec.gammas, str(spec.path), sha, adapter.format, adapter.rank,
                        coverage, fields["factors"], fields["factors_key"])
    return record, True


def register_fast(options: ExportOptions, progress: Callable[[str], None] = lambda msg: None) -> ExportReport | None:
    """Step 1 of every ``craft export`` (check ``--out`` and the runtime before anything is written), then
    the LoRA-only update of a runtime repository when that is all the export has to do; ``None``:
    networks must be built (:func:`craft_export.exporter.export_networks`)."""
    t_start = time.perf_counter()
    out = Path(options.out).resolve()
    old = existing_manifest(out)
    check_runtime(options)
    if options.lora_mode != "runtime" or not old:
        return None
    report = register_loras(options, out, old, progress)
    if report is not None:
        report.seconds = time.perf_counter() - t_start
    return report


def register_loras(options: ExportOptions, out: Path, old: Mapping,
                   progress: Callable[[str], None] = lambda msg: None) -> ExportReport | None:
    """Register / update / remove the LoRAs of runtime repository ``out``; None when a full export is needed."""
    runtime = old.get("runtime_lora")
    if old.get("lora_mode") != "runtime" or old.get("format_version") != FORMAT_VERSION or not runtime:
        return None
    recipe = load_confined_recipe(options.recipe, options.confine_to)
    try:
        pairs = parse_pairs(options.pairs, {s.name: s.kind for s in recipe.loras})
    except PlanError:
        return None  # the full export reports it
    if fingerprint(recipe, options, pairs) != runtime.get("fingerprint"):
        return None
    try:
        layout, shapes = rt.read_layout_files(out / rt.RUNTIME_MODEL)
    except (OSError, KeyError, ValueError, TypeError):
        return None
    hot = {n for p in pairs for n in p}
    old_loras = {rec["name"]: rec for rec in old.get("loras", [])}
    report = ExportReport(reused=sorted(old.get("models", {})), fast_path=True)
    written, kept = [], []
    with RepoTransaction(out) as txn:
        records = []
        for spec in recipe.loras:
            prev = old_loras.get(spec.name)
            if spec.name in hot:  # unchanged: the fingerprint covers the hot pairs' files
                if prev is None:
                    return None
                records.append(LoraRecord.from_json(prev))
                continue
            try:
                record, new = _record(spec, recipe, out, layout, shapes, prev)
            except _NeedsFullExport:
                return None
            (written if new else kept).append(spec.name)
            records.append(record)
            if new:
                progress(f"registered LoRA {spec.name} (rank {record.rank}) -> {record.factors}")
        manifest = {**old, "loras": [r.to_json() for r in records]}
        txn.commit([], manifest)
    remove_unreferenced_factors(out, {r.factors for r in records if r.factors})
    report.loras = {"written": written, "kept": kept, "removed": sorted(set(old_loras) - {s.name for s in recipe.loras})}
    log.info("runtime LoRAs: wrote %s, kept %s", written, kept)
    return report
