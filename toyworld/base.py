"""The toy-world base model: an SD 1.5-layout diffusers folder small enough to train on a CPU.

Architecture (chosen for a 64 px world and a <= 60 min budget on 2 CPU cores):

* VAE: ``AutoencoderKL`` with three levels (16, 32, 64 channels), so a factor-4 downsampling:
  64 px images <-> (4, 16, 16) latents. No attention in its mid block, so it is purely
  convolutional and can be trained on 32 px crops (4x cheaper per image) and used at 64 px.
* Text encoder: a frozen, randomly initialised ``CLIPTextModel`` (64 wide, 2 layers) over a
  word-level BPE vocabulary (every caption word and the rare tokens ``sks`` / ``zzs`` are one
  token each). A random causal transformer keeps each token's identity in its output, and the
  UNet's cross-attention learns to read it; like a real checkpoint's encoder it is never
  trained with the UNet, and ``sks`` / ``zzs`` are tokens the UNet never saw.
* UNet: ``UNet2DConditionModel`` in the SD 1.5 block layout (cross-attention down blocks, a
  plain last down block, the mirror image on the way up, a cross-attention mid block) with
  three levels of (32, 64, 128) channels and one layer per block: about 3.2 M parameters.
* Scheduler: SD 1.5's (``EulerDiscreteScheduler``, scaled-linear betas, epsilon prediction).

:func:`save_base` writes ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/`` in fp16 (the weights are committed), which every loader of
the project reads like a real SD 1.5 checkpoint (its demo recipe names the toy UNet's routing, ``craft_toyworld.concepts.TOY_ROUTING``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from craft_export.architectures import SCHEDULER_CONFIG
from craft_reference.tiny import write_clip_tokenizer

from .world import CAPTION_WORDS

__all__ = ["RARE_TOKENS", "VAE_CONFIG", "UNET_CONFIG", "TEXT_CONFIG", "build_vae", "build_unet",
           "build_text_encoder", "write_tokenizer", "save_base", "SCHEDULER"]

RARE_TOKENS = ("sks", "zzs")  # DreamBooth identifiers: in the vocabulary, never in a base caption

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64, mid_block_add_attention=False,
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
)
TEXT_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   projection_dim=64, max_position_embeddings=16)
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", **SCHEDULER_CONFIG}


def build_vae(generator_seed: int):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        return AutoencoderKL(**VAE_CONFIG)


def build_unet(generator_seed: int):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        return UNet2DConditionModel(**UNET_CONFIG)


def write_tokenizer(out: Path) -> dict[str, int]:
    """The word-level CLIP BPE tokenizer; returns its vocabulary."""
    write_clip_tokenizer(out, words=(*CAPTION_WORDS, *RARE_TOKENS), max_length=TEXT_CONFIG["max_position_embeddings"])
    return json.loads((out / "vocab.json").read_text())


def build_text_encoder(vocab: dict[str, int], seed: int):
    """A frozen random ``CLIPTextModel``: token embeddings N(0, 1), positions N(0, 0.3^2), layers N(0, 1/fan_in)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(vocab), pad_token_id=vocab["<|endoftext|>"],
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], **TEXT_CONFIG)
    model = CLIPTextModel(config)
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("token_embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("position_embedding.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return model.eval().requires_grad_(False)


def save_base(out: Path, unet, vae, text_encoder, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write an SD 1.5-layout diffusers folder (tokenizer included) with weights in ``dtype``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        copy = type(module).from_config(module.config) if name != "text_encoder" else type(module)(module.config)
        copy.load_state_dict(module.state_dict())
        copy.to(dtype).save_pretrained(out / name, safe_serialization=True)
    write_tokenizer(out / "tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder": ["transformers", "CLIPTextModel"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
