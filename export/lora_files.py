"""LoRA files the project writes, in the layouts other tools load, and the adapter metadata they carry.

* :func:`save_lora`: diffusers / PEFT layout (``unet.<module>.lora_A.weight`` / ``lora_B``) with a
  complete ``lora_adapter_metadata`` entry, which diffusers' ``load_lora_weights`` turns into
  PEFT's ``LoraConfig``: the keys are prefixed with the component (``unet.r``, ``unet.lora_alpha``,
  ``unet.target_modules``, and ``unet.rank_pattern`` / ``unet.alpha_pattern`` when modules differ),
  as diffusers' own ``save_lora_weights`` writes them. (diffusers reads the metadata *instead of*
  inferring a config from the tensors; an entry without ``target_modules`` makes PEFT fail.)
* :func:`save_kohya_lora`: ``lora_unet_<module>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``
  (A1111, ComfyUI, kohya tools); SDXL files use the SGM block names kohya's SDXL trainer writes.
* :func:`metadata_alphas`: the alpha(s) a file's metadata declares, read back by ``load_lora``.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from craft_ops.lazy import torch  # metadata_alphas runs without torch (runtime LoRA registration)
from craft_ops.sgm_names import sgm_names

if TYPE_CHECKING:
    import torch as _torch

__all__ = ["LoraFileError", "adapter_metadata", "save_lora", "save_kohya_lora", "metadata_alphas"]

Factors = Mapping[str, "tuple[_torch.Tensor, _torch.Tensor]"]  # module -> (A / down (r, d_in...), B / up (d_out, r...))


class LoraFileError(ValueError):
    """LoRA factors or metadata that cannot be written or read; the message names the field."""


def _check_factors(factors: Factors) -> dict[str, int]:
    if not factors:
        raise LoraFileError("factors: no modules to write")
    ranks = {}
    for module, (A, B) in factors.items():
        if A.ndim not in (2, 4) or B.ndim != A.ndim or A.shape[0] != B.shape[1]:
            raise LoraFileError(f"factors[{module!r}]: need A (r, d_in[, kh, kw]) and B (d_out, r[, 1, 1]), "
                                f"got A{tuple(A.shape)} B{tuple(B.shape)}")
        ranks[module] = int(A.shape[0])
    return ranks


def _alpha_of(alpha: float | Mapping[str, float], module: str) -> float:
    value = alpha.get(module) if isinstance(alpha, Mapping) else alpha
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise LoraFileError(f"alpha[{module!r}]: must be a positive number, got {value!r}")
    return float(value)


def adapter_metadata(ranks: Mapping[str, int], alpha: float | Mapping[str, float], *, prefix: str = "unet") -> str:
    """The ``lora_adapter_metadata`` JSON diffusers needs to build PEFT's ``LoraConfig`` for a component.

    ``ranks``: module name -> rank; ``alpha``: one value or per module. The most common rank /
    alpha is the default, the others go to ``rank_pattern`` / ``alpha_pattern`` (anchored full
    module names, as diffusers writes them).
    """
    if not ranks:
        raise LoraFileError("ranks: no modules")
    alphas = {m: _alpha_of(alpha, m) for m in ranks}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    a = collections.Counter(alphas.values()).most_common(1)[0][0]
    config: dict[str, object] = {"r": r, "lora_alpha": a, "target_modules": sorted(ranks)}
    rank_pattern = {f"^{m}": v for m, v in sorted(ranks.items()) if v != r}
    alpha_pattern = {f"^{m}": v for m, v in sorted(alphas.items()) if v != a}
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    if alpha_pattern:
        config["alpha_pattern"] = alpha_pattern
    return json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)


def _metadata(extra: Mapping[str, str] | None) -> dict[str, str]:
    out = {"format": "pt"}
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LoraFileError(f"metadata[{k!r}]: keys and values must be strings, got {v!r}")
        out[k] = v
    return out


def save_lora(path: Path, factors: Factors, *, alpha: float | Mapping[str, float],
              metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers / PEFT-layout LoRA that ``pipe.load_lora_weights(path)`` and ``load_lora`` read.

    ``factors``: UNet module -> (A, B) with ``dW = alpha / r * B @ A``. ``metadata``: extra
    string entries (``craft.*``); ``lora_adapter_metadata`` is always written from the factors.
    """
    from safetensors.torch import save_file

    ranks = _check_factors(factors)
    meta = _metadata(metadata)
    meta["lora_adapter_metadata"] = adapter_metadata(ranks, alpha)
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"unet.{module}.lora_A.weight"] = A.detach().to(dtype or A.dtype).cpu().contiguous()
        tensors[f"unet.{module}.lora_B.weight"] = B.detach().to(dtype or B.dtype).cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def save_kohya_lora(path: Path, factors: Factors, *, alpha: float | Mapping[str, float],
                    unet_modules: Sequence[str] | None = None, metadata: Mapping[str, str] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a kohya-layout LoRA: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

    ``unet_modules`` (every module name of the UNet): when given, modules are spelled with the
    SGM / LDM block names (``input_blocks_4_1_...``) as kohya's SDXL trainer writes them;
    otherwise with diffusers names (SD 1.5 trainers). Both layouts load in A1111 / ComfyUI,
    diffusers and :func:`craft_export.loading.load_lora`.
    """
    from safetensors.torch import save_file

    ranks = _check_factors(factors)
    rename = {m: m for m in factors}
    if unet_modules is not None:
        to_sgm = {d: s for s, d in sgm_names(list(unet_modules)).items()}
        missing = sorted(set(factors) - set(to_sgm))
        if missing:
            raise LoraFileError(f"factors: modules without an SGM name in this UNet: {missing[:3]}")
        rename = {m: to_sgm[m] for m in factors}
    tensors = {}
    for module, (A, B) in factors.items():
        key = "lora_unet_" + rename[module].replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = A.detach().to(dtype or A.dtype).cpu().contiguous()
        tensors[f"{key}.lora_up.weight"] = B.detach().to(dtype or B.dtype).cpu().contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(_alpha_of(alpha, module), dtype=dtype or A.dtype)
    meta = _metadata(metadata)
    common_rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    meta.setdefault("ss_network_module", "networks.lora")
    meta.setdefault("ss_network_dim", str(common_rank))
    if not isinstance(alpha, Mapping):
        meta.setdefault("ss_network_alpha", f"{float(alpha):g}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def _pattern_value(patterns: Mapping[str, float], module: str) -> float | None:
    """PEFT's pattern lookup (``peft.utils.other.get_pattern_key``): ``(.*\\.)?(<key>)$``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return None


def metadata_alphas(metadata: Mapping[str, str], module_names: Iterable[str]) -> float | dict[str, float] | None:
    """The PEFT alpha(s) declared in a LoRA file's metadata, or ``None`` when it declares none.

    Reads diffusers' ``lora_adapter_metadata`` (component-prefixed ``unet.lora_alpha`` /
    ``unet.alpha_pattern`` as diffusers writes them, or the bare ``lora_alpha`` older files of
    this project carry) and the project's plain ``alpha`` entry. A per-module mapping is
    returned when the metadata has an ``alpha_pattern``.
    """
    raw = metadata.get("lora_adapter_metadata") or metadata.get("unet.lora_adapter_metadata")
    if raw is not None:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise LoraFileError(f"metadata lora_adapter_metadata: not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise LoraFileError(f"metadata lora_adapter_metadata: must be a JSON object, got {raw[:80]!r}")
        prefixed = any(k.startswith("unet.") for k in config)
        config = {k.removeprefix("unet."): v for k, v in config.items() if k.startswith("unet.") or not prefixed}
        if config.get("use_rslora"):
            raise LoraFileError("metadata lora_adapter_metadata: use_rslora = true (scale alpha / sqrt(r)) "
                                "is not supported")
        if "lora_alpha" in config:
            try:
                alpha = float(config["lora_alpha"])
            except (TypeError, ValueError) as exc:
                raise LoraFileError(f"metadata lora_adapter_metadata: lora_alpha is not a number: "
                                    f"{config['lora_alpha']!r}") from exc
            patterns = config.get("alpha_pattern") or {}
            if not patterns:
                return alpha
            out = {}
            for m in module_names:
                value = _pattern_value(patterns, m)
                out[m] = alpha if value is None else value
            return out
    if "alpha" in metadata:
        try:
            return float(metadata["alpha"])
        except ValueError as exc:
            raise LoraFileError(f"metadata alpha: not a number: {metadata['alpha']!r}") from exc
    return None
