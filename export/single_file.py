"""Single-file SD 1.5 / SDXL checkpoints (original LDM / SGM layout ``.safetensors``) -> a diffusers folder.

What most users download is one ``.safetensors`` file. It is converted once, offline, into an
ordinary diffusers pipeline folder (cached; the same file and configs give the same folder), so
everything downstream - reference, exporter, assets, hashing - reads it like any other folder.

* UNet and VAE: diffusers' own single-file loaders (``from_single_file`` with ``config=`` a local
  folder, ``local_files_only=True``: no hub access, ``HF_HUB_OFFLINE=1`` works).
* Text encoders: diffusers' conversion functions (``convert_ldm_clip_checkpoint`` /
  ``convert_open_clip_checkpoint``) with the prefix of each encoder named explicitly. (diffusers'
  pipeline-level loader guesses which CLIP a checkpoint holds from embedding widths, and
  guesses wrong when both SDXL encoders have the same width, as the tiny test models do.)
* Configs: the project's architecture tables (:mod:`.architectures`) for the detected
  architecture, overlaid by ``config`` (recipe ``base.config``): a folder in the diffusers layout,
  weights not needed, e.g. the model's diffusers repository. The CLIP tokenizer files
  (``tokenizer/``, SDXL also ``tokenizer_2/``) are not in any single-file checkpoint and cannot be
  generated offline, so ``config`` must supply them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .safe_files import ITEMSIZE, UnsafeFileError, check_safetensors

log = logging.getLogger(__name__)

__all__ = ["SingleFileError", "single_file_arch", "write_config_folder", "convert_single_file", "single_file_folder"]

_FORMAT = 1  # bump when the conversion changes: cached folders are rebuilt
_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
_KEYS = {
    "sd15": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "sdxl": "conditioner.embedders.1.model.positional_embedding",
}
_CLIP_PREFIX = {"sd15": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
_PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


class SingleFileError(ValueError):
    """A single-file checkpoint that cannot be converted; the message names the file."""


def single_file_arch(path: Path, keys) -> str:
    """``sd15`` or ``sdxl`` from a checkpoint's tensor names."""
    keys = set(keys)
    if _UNET_KEY not in keys:
        raise SingleFileError(f"{path}: not a Stable Diffusion single-file checkpoint (no {_UNET_KEY})")
    for arch, key in _KEYS.items():
        if key in keys:
            return arch
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise SingleFileError(f"{path}: an SD 2.x checkpoint (OpenCLIP-H text encoder); only SD 1.5 and SDXL "
                              f"are supported")
    raise SingleFileError(f"{path}: no SD 1.5 ({_KEYS['sd15']}) or SDXL ({_KEYS['sdxl']}) text encoder found "
                          f"(an SDXL refiner or an inpainting model?)")


def write_config_folder(arch: str, out: Path, config: Path | None = None) -> Path:
    """The diffusers config folder for ``arch``: the project's tables, overlaid by ``config``'s files."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from .architectures import SCHEDULER_CONFIG, UNET_CONFIGS, VAE_CONFIG, VAE_SCALING, spec_configs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoders = ["text_encoder", "text_encoder_2"] if arch == "sdxl" else ["text_encoder"]
    index = {"_class_name": _PIPELINES[arch], "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    with torch.device("meta"):
        UNet2DConditionModel.from_config(dict(UNET_CONFIGS[arch])).save_config(out / "unet")
        AutoencoderKL.from_config(dict(VAE_CONFIG, scaling_factor=VAE_SCALING[arch])).save_config(out / "vae")
    specs = spec_configs(arch)
    for name in encoders:
        CLIPTextConfig(**specs[name]).save_pretrained(out / name)
        index[name] = ["transformers", "CLIPTextModelWithProjection" if name.endswith("_2") else "CLIPTextModel"]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    if arch == "sd15":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=True)  # as the released SDXL base
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", **SCHEDULER_CONFIG}, indent=2))
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        _overlay(Path(config), out, arch)
    for name in encoders:
        tok = out / name.replace("text_encoder", "tokenizer")
        if not (tok / "vocab.json").is_file() or not (tok / "merges.txt").is_file():
            raise SingleFileError(
                f"{tok.name}/vocab.json and merges.txt are needed to use a single-file checkpoint (no checkpoint "
                f"holds them); set base.config to a folder with {tok.name}/ (e.g. the model's diffusers repository, "
                f"weights not needed)" + ("" if config is None else f"; {config} has none"))
    return out


def _overlay(config: Path, out: Path, arch: str) -> None:
    if not config.is_dir():
        raise SingleFileError(f"base.config: folder not found: {config}")
    index_file = config / "model_index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        if index.get("_class_name") != _PIPELINES[arch]:
            raise SingleFileError(f"{index_file}: a {index.get('_class_name')} folder, but the checkpoint is {arch} "
                                  f"({_PIPELINES[arch]})")
        shutil.copy(index_file, out / "model_index.json")
    for sub in sorted(p for p in config.iterdir() if p.is_dir()):
        for f in sub.iterdir():
            if f.is_file() and f.suffix in (".json", ".txt", ".model"):
                (out / sub.name).mkdir(exist_ok=True)
                shutil.copy(f, out / sub.name / f.name)


def _load_text_encoder(arch: str, name: str, checkpoint: dict, config_dir: Path, dtype: torch.dtype):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(config_dir / name)
    model = (CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel)(config)
    if name == "text_encoder_2":
        state = convert_open_clip_checkpoint(model, checkpoint, prefix=_OPEN_CLIP_PREFIX)
    else:
        state = convert_ldm_clip_checkpoint(
            {k: v for k, v in checkpoint.items() if k.startswith(_CLIP_PREFIX[arch])}, _CLIP_PREFIX[arch])
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise SingleFileError(f"{name}: checkpoint and config disagree (missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]})")
    return model.to(dtype)


def convert_single_file(path: Path, out: Path, *, config: Path | None = None) -> Path:
    """Convert a single-file checkpoint into a diffusers folder ``out`` (weights in the file's dtype)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        check_safetensors(path, dtypes=tuple(ITEMSIZE))  # checkpoints hold integer buffers too (position_ids)
        checkpoint = load_file(str(path))
    except UnsafeFileError as exc:
        raise SingleFileError(f"not a readable safetensors file: {exc}") from exc
    except (SafetensorError, OSError) as exc:
        raise SingleFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    arch = single_file_arch(path, checkpoint)
    dtype = checkpoint[_UNET_KEY].dtype
    out = Path(out)
    config_dir = write_config_folder(arch, out / ".config", config)
    try:
        for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            model = cls.from_single_file(checkpoint, config=str(config_dir), subfolder=name, local_files_only=True,
                                         torch_dtype=dtype)
            if any(p.is_meta for p in model.parameters()):
                raise SingleFileError(f"{path}: {name} weights missing from the checkpoint")
            model.save_pretrained(out / name, safe_serialization=True)
            del model
        for name in (["text_encoder", "text_encoder_2"] if arch == "sdxl" else ["text_encoder"]):
            _load_text_encoder(arch, name, checkpoint, config_dir, dtype).save_pretrained(out / name)
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        if isinstance(exc, SingleFileError):
            raise SingleFileError(f"{path}: {exc}") from exc
        raise SingleFileError(f"{path}: cannot convert with the configs of {config or 'the ' + arch + ' tables'} "
                              f"({type(exc).__name__}: {exc})") from exc
    for sub in ["scheduler", "tokenizer"] + (["tokenizer_2"] if arch == "sdxl" else []):
        shutil.copytree(config_dir / sub, out / sub, dirs_exist_ok=True)
    shutil.copy(config_dir / "model_index.json", out / "model_index.json")
    shutil.rmtree(config_dir)
    return out


def _fingerprint(path: Path, config: Path | None) -> str:
    st = path.stat()
    h = hashlib.sha256(json.dumps([_FORMAT, str(path.resolve()), st.st_size, st.st_mtime_ns]).encode())
    if config is not None:
        for f in sorted(Path(config).rglob("*")):
            if f.is_file() and f.suffix in (".json", ".txt", ".model"):
                h.update(str(f.relative_to(config)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def single_file_folder(path: Path, *, config: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The cached diffusers folder of a single-file checkpoint, converted on first use.

    ``cache_dir``: default ``$CRAFT_CACHE_DIR`` or ``~/.cache/craft-lora-serve``; the folder is
    keyed by the file (path, size, mtime) and the config files, and written atomically.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SingleFileError(f"{path}: single-file checkpoints must be .safetensors (pickled .ckpt files can run "
                              f"code when loaded and are refused)")
    if not path.is_file():
        raise SingleFileError(f"single-file checkpoint not found: {path}")
    root = Path(cache_dir or os.environ.get("CRAFT_CACHE_DIR") or Path.home() / ".cache" / "craft-lora-serve")
    folder = root / "single-file" / f"{path.stem}-{_fingerprint(path, config)}"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting single-file checkpoint %s into %s", path, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=folder.parent))
    try:
        convert_single_file(path, tmp, config=config)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "model_index.json").is_file():  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
