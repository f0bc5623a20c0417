"""diffusers pipeline weights -> the original single-file layout (LDM / SGM key names).

The inverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``):
``model.diffusion_model.*`` (SGM UNet names, :mod:`craft_ops.sgm_names`), ``first_stage_model.*``
(LDM VAE, attention projections as 1x1 convs), ``cond_stage_model.transformer.*`` (SD 1.5 CLIP)
or ``conditioner.embedders.0.transformer.*`` / ``conditioner.embedders.1.model.*`` (SDXL CLIP-L and
OpenCLIP bigG with fused ``in_proj`` and a transposed ``text_projection``). Used to write
single-file checkpoints of the tiny models for tests, and by anyone who needs a ``.safetensors``
in the layout A1111 / ComfyUI load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from craft_ops.sgm_names import sgm_names

__all__ = ["unet_to_sgm", "vae_to_ldm", "clip_to_ldm", "open_clip_to_ldm", "write_single_file"]


def unet_to_sgm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.<SGM name>`` for every UNet parameter."""
    modules = [n for n, _ in unet.named_modules() if n]
    names = {d: s for s, d in sgm_names(modules).items()}
    out = {}
    for key, value in unet.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        if module not in names:
            raise ValueError(f"UNet parameter {key!r} has no SGM name")
        out[f"model.diffusion_model.{names[module]}.{leaf}"] = value
    return out


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``first_stage_model.<LDM name>`` for every VAE parameter."""
    n_up = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", new):
            sub, leaf = m[3].rsplit(".", 1)
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_VAE_RESNET.get(sub, sub)}.{leaf}"
        elif m := re.match(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", new):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", new):
            sub, leaf = m[3].rsplit(".", 1)
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_VAE_RESNET.get(sub, sub)}.{leaf}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", new):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", new):
            sub, leaf = m[3].rsplit(".", 1)
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_VAE_RESNET.get(sub, sub)}.{leaf}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value.reshape(*value.shape, 1, 1)  # linear -> 1x1 conv
        out[f"first_stage_model.{new}"] = value
    return out


def clip_to_ldm(encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model under ``prefix`` with HF names (``text_model.`` included)."""
    out = {}
    for key, value in encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        key = key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"
        out[prefix + key] = value
    return out


_OPEN_CLIP = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
              ("self_attn.out_proj", "attn.out_proj")]


def open_clip_to_ldm(encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` in OpenCLIP names under ``prefix`` (SDXL's second encoder)."""
    sd = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
           prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        head = f"encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat(
                [sd.pop(f"{head}self_attn.{p}_proj.{leaf}") for p in ("q", "k", "v")])
        for key in [k for k in sd if k.startswith(head)]:
            rest = key[len(head):]
            for old, new in _OPEN_CLIP:
                rest = rest.replace(old, new)
            out[f"{prefix}transformer.resblocks.{i}.{rest}"] = sd.pop(key)
    if sd:
        raise ValueError(f"text_encoder_2 parameters without an OpenCLIP name: {sorted(sd)[:3]}")
    return out


def write_single_file(folder: Path, out: Path, *, dtype: torch.dtype | None = None,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write a diffusers SD 1.5 / SDXL folder as one original-layout ``.safetensors`` checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    tensors = unet_to_sgm(unet)
    tensors |= vae_to_ldm(AutoencoderKL.from_pretrained(folder / "vae"))
    if sdxl:
        tensors |= clip_to_ldm(CLIPTextModel.from_pretrained(folder / "text_encoder"),
                               "conditioner.embedders.0.transformer.")
        tensors |= open_clip_to_ldm(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
                                    "conditioner.embedders.1.model.")
    else:
        tensors |= clip_to_ldm(CLIPTextModel.from_pretrained(folder / "text_encoder"), "cond_stage_model.transformer.")
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=dict(metadata or {}))
    return out
