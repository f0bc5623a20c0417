"""Files on disk -> in-memory models and LoRAs, with every failure naming the file.

Only safetensors LoRAs are read: pickled ``.ckpt`` / ``.pt`` / ``.bin`` files can run code
when loaded and are refused outright.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from craft_ops.lora import LoraAdapter, LoraError, bake_adapter, parse_lora

from .lora_files import LoraFileError, metadata_alphas
from .lora_read import LoadError, read_lora_file, sha256_file
from .lora_read import require as _require
from .single_file import SingleFileError, single_file_folder

log = logging.getLogger(__name__)

__all__ = [
    "LoadError",
    "PipelineParts",
    "detect_arch",
    "load_pipeline_parts",
    "load_unet",
    "weights_variant",
    "unet_module_shapes",
    "unet_weights",
    "read_lora_file",
    "load_lora",
    "sha256_file",
]

def detect_arch(path: Path) -> str:
    """``sd15`` or ``sdxl`` from a diffusers folder's UNet config (or a bare UNet folder)."""
    path = Path(path)
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    config_file = _require(unet_dir / "config.json", "UNet config")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise LoadError(f"{config_file}: not valid JSON ({exc})") from exc
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"


_WEIGHTS_RE = re.compile(r"^(?:diffusion_pytorch_model|model)(?:\.(?P<variant>[A-Za-z0-9_]+))?"
                         r"(?:-\d{5}-of-\d{5})?\.safetensors$")
_INDEX_RE = re.compile(r"^(?:diffusion_pytorch_model|model)\.safetensors\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$")


def _variants(folder: Path) -> set[str | None]:
    """Weight variants in a component folder (``None``: the plain weights)."""
    folder = Path(folder)
    found: set[str | None] = set()
    for f in folder.iterdir() if folder.is_dir() else ():
        m = _WEIGHTS_RE.match(f.name) or _INDEX_RE.match(f.name)
        if m:
            found.add(m["variant"])
    return found


def weights_variant(folder: Path, variant: str | None = None) -> str | None:
    """The ``variant`` to load a component folder with (``fp16`` for ``model.fp16.safetensors``).

    The requested variant (recipe ``base.variant``) where the folder has it; otherwise the plain
    weights when present, else the one variant the folder holds (the usual download of SD 1.5 /
    SDXL has only ``fp16`` files).
    """
    found = _variants(folder)
    if variant is not None and variant in found:
        return variant
    if variant is not None and found:
        log.info("%s: no %s weights, loading %s", folder, variant, "the plain ones" if None in found else sorted(found))
    if None in found or not found:
        return None
    if len(found) > 1:
        raise LoadError(f"{folder}: several weight variants {sorted(found)} and no plain weights; "
                        f"choose one with base.variant")
    return next(iter(found))


def load_unet(path: Path, dtype: torch.dtype = torch.float32, *, variant: str | None = None):
    """A ``UNet2DConditionModel`` from a pipeline folder (``unet/``) or a bare UNet folder."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    _require(unet_dir / "config.json", "UNet config")
    try:
        unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype,
                                                    variant=weights_variant(unet_dir, variant))
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot load UNet from {unet_dir}: {exc}") from exc
    return unet.eval().requires_grad_(False)


@dataclass
class PipelineParts:
    """The loaded components of one SD 1.5 / SDXL pipeline folder."""

    arch: str
    path: Path
    unet: Any
    vae: Any
    tokenizers: list[Any]
    text_encoders: list[Any]
    scheduler_config: dict
    extra: dict = field(default_factory=dict)

    @property
    def latent_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_pipeline_parts(path: Path, *, backbone: Path | None = None, dtype: torch.dtype = torch.float32,
                        variant: str | None = None, config: Path | None = None) -> PipelineParts:
    """Load UNet (or the W_init backbone), VAE, tokenizer(s), text encoder(s) and scheduler config.

    ``path``: a diffusers folder, or a single-file ``.safetensors`` checkpoint (converted once
    into a cached folder, :mod:`.single_file`; ``config`` supplies its tokenizers and configs).
    ``variant``: weight variant to prefer (``fp16``); by default the one each folder holds.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    extra = {}
    if path.suffix.lower() in (".safetensors", ".ckpt") or path.is_file():
        try:
            folder = single_file_folder(path, config=config)
        except SingleFileError as exc:
            raise LoadError(str(exc)) from exc
        extra["single_file"] = str(path)
        path = folder
    _require(path, "base model folder")
    arch = detect_arch(path)
    names = ["", "_2"] if arch == "sdxl" else [""]
    for sub in ["vae", "scheduler"] + [f"tokenizer{s}" for s in names] + [f"text_encoder{s}" for s in names]:
        _require(path / sub, f"{sub} folder of {arch} model")
    if variant is not None and not any(variant in _variants(path / sub) for sub in
                                       ["unet", "vae"] + [f"text_encoder{s}" for s in names]):
        raise LoadError(f"{path}: no component has {variant!r} weights; fix base.variant")
    unet = load_unet(backbone if backbone is not None else path, dtype, variant=variant)
    if backbone is not None and detect_arch(backbone) != arch:
        raise LoadError(f"backbone {backbone} is not a {arch} UNet")
    try:
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype,
                                            variant=weights_variant(path / "vae", variant))
        vae = vae.eval().requires_grad_(False)
        tokenizers = [CLIPTokenizer.from_pretrained(path / f"tokenizer{s}") for s in names]
        encoders = []
        for s in names:
            cls = CLIPTextModelWithProjection if s == "_2" else CLIPTextModel
            folder = path / f"text_encoder{s}"
            encoders.append(cls.from_pretrained(folder, dtype=dtype, variant=weights_variant(folder, variant))
                            .eval().requires_grad_(False))
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot load pipeline components from {path}: {exc}") from exc
    scheduler_file = _require(path / "scheduler" / "scheduler_config.json", "scheduler config")
    extra["force_zeros_for_empty_prompt"] = _force_zeros(path, arch)
    return PipelineParts(arch, path, unet, vae, tokenizers, encoders, json.loads(scheduler_file.read_text()), extra)


def _force_zeros(path: Path, arch: str) -> bool:
    """SDXL's ``force_zeros_for_empty_prompt`` from ``model_index.json`` (diffusers' default: true).

    With it, diffusers' ``StableDiffusionXLPipeline`` uses zero text embeddings (context and
    pooled) for the unconditional branch when no negative prompt is given.
    """
    if arch != "sdxl":
        return False
    index_file = path / "model_index.json"
    if not index_file.is_file():
        return True
    try:
        return bool(json.loads(index_file.read_text()).get("force_zeros_for_empty_prompt", True))
    except json.JSONDecodeError as exc:
        raise LoadError(f"{index_file}: not valid JSON ({exc})") from exc


def unet_module_shapes(unet: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shape of every Linear / Conv module of the UNet, keyed by module name."""
    return {
        name: tuple(m.weight.shape)
        for name, m in unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


def unet_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> weight tensor for every Linear / Conv module (W_init of Eq. 8)."""
    return {
        name: m.weight.detach()
        for name, m in unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


def load_lora(path: Path, module_shapes: Mapping[str, tuple[int, ...]], *, name: str,
              weights: Mapping[str, torch.Tensor] | None = None) -> tuple[LoraAdapter, dict[str, str]]:
    """Read and parse a LoRA file against a UNet's module shapes; errors name the file.

    ``weights`` (module -> W_init, e.g. :func:`unet_weights` of the pipeline's UNet): DoRA
    modules are baked against them here (their delta depends on the weight they are applied
    to); a file with DoRA modules and no ``weights`` is refused.
    """
    tensors, metadata = read_lora_file(path)
    try:
        alphas = metadata_alphas(metadata, module_shapes)
        adapter = parse_lora(tensors, module_shapes, name=name, alphas=alphas)
        if adapter.needs_base:
            if weights is None:
                dora = sorted(m for m, f in adapter.modules.items() if f.needs_base)
                raise LoadError(f"{path}: DoRA modules ({dora[0]}, ... {len(dora)} in all) are baked against the "
                                f"base weights, and none were given (load_lora(..., weights=unet_weights(unet)))")
            adapter = bake_adapter(adapter, weights)
    except (LoraError, LoraFileError) as exc:
        raise LoadError(f"{path}: {exc}") from exc
    return adapter, metadata
