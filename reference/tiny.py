"""SD 1.5 / SDXL models built offline from the public architectures: tiny, or full-size.

The folders are ordinary diffusers pipeline folders (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder[_2]/``, ``tokenizer[_2]/``, ``scheduler/``), so everything
downstream loads them with the code that loads a real checkpoint. Weights come from a
seeded generator: the same seed gives the same bytes.

``size="tiny"``: small widths (the demo and the tests). ``size="full"``: the public full-size
configs of :mod:`.architectures` with random weights, saved in fp16 like the released
checkpoints - for exporting and timing engines of the real layouts (speed does not depend on
the values; the images are noise). The tokenizer is always the small generated BPE one; a
full-size text encoder keeps CLIP's 49408-token embedding table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from craft_export.architectures import CLIP_BIGG, CLIP_L, CLIP_TOKENS, SCHEDULER_CONFIG, UNET_CONFIGS, VAE_CONFIG, VAE_SCALING

__all__ = ["SIZES", "TINY_CONFIGS", "build_pipeline", "build_tiny_pipeline", "write_clip_tokenizer"]

# The full-size models' scheduler (key order fixes the bytes of scheduler_config.json).
_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", **SCHEDULER_CONFIG}

_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(8, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64,
)

# UNet kwargs mirror REFERENCE-ARCHITECTURES.md with widths divided down.
TINY_CONFIGS: dict[str, dict] = {
    "sd15": {
        "pipeline": "StableDiffusionPipeline",
        "unet": dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(16, 32, 32, 32),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
        ),
        "text_encoders": [dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, projection_dim=32, with_projection=False)],
        "vae": _VAE,
        "scaling_factor": VAE_SCALING["sd15"],
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
            cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        ),
        "text_encoders": [
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 projection_dim=32, with_projection=False),
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 projection_dim=32, with_projection=True, hidden_act="gelu"),
        ],
        "vae": _VAE,
        "scaling_factor": VAE_SCALING["sdxl"],
    },
}



def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE on one word: merge the best-ranked adjacent pair until none is known."""
    while len(pieces) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


_WORDS = ("the", "in", "style", "dog", "cat", "of", "and", "watercolor", "photo", "painting")


def write_clip_tokenizer(out: Path, *, pad_token: str = "<|endoftext|>", words: Sequence[str] = _WORDS,
                         max_length: int = 77) -> int:
    """Write a byte-level CLIP BPE tokenizer (vocab.json, merges.txt); returns its vocab size.

    The vocabulary is every byte symbol plus its end-of-word form, with merges for the
    lowercase letter pairs of ``words``, so each of them tokenizes into one token. Prompts are
    padded / truncated to ``max_length`` tokens (the text encoder's ``max_position_embeddings``).
    """
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in words:
        # the pieces BPE makes of the word with the merges so far, then chain them into one token
        # (later merges rank lower, so they never split a word merged earlier)
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], {m: r for r, m in enumerate(merges)})
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
                if merged not in vocab_tokens:
                    vocab_tokens.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_tokens)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token, "errors": "replace", "clean_up_tokenization_spaces": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))
    return len(vocab)


def _text_encoder(spec: dict, vocab_size: int, pad_id: int, eos_id: int, bos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = dict(spec)
    with_projection = spec.pop("with_projection")
    config = CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=77, pad_token_id=pad_id,
        bos_token_id=bos_id, eos_token_id=eos_id, **spec,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def _randomise(module: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> None:
    """Seeded weights; zero-initialised layers of diffusers (conv_out etc.) get values too."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("weight") and p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) * (1.0 / fan_in) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(std * torch.randn(p.shape, generator=generator))


# The public full-size architectures in TINY_CONFIGS' form.
FULL_CONFIGS: dict[str, dict] = {
    arch: {
        "pipeline": TINY_CONFIGS[arch]["pipeline"],
        "unet": UNET_CONFIGS[arch],
        "vae": dict(VAE_CONFIG, sample_size=512 if arch == "sd15" else 1024),
        "text_encoders": [dict(CLIP_L, with_projection=False)]
        + ([dict(CLIP_BIGG, with_projection=True)] if arch == "sdxl" else []),
        "scaling_factor": VAE_SCALING[arch],
        "vocab_size": CLIP_TOKENS["vocab_size"],
    }
    for arch in ("sd15", "sdxl")
}
SIZES = ("tiny", "full")


def build_tiny_pipeline(arch: str, out: Path, *, seed: int = 0) -> Path:
    """Write a tiny diffusers pipeline folder of architecture ``sd15`` or ``sdxl`` to ``out``."""
    return build_pipeline(arch, out, seed=seed, size="tiny")


def _save(module: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
    module.to(dtype).save_pretrained(folder, safe_serialization=True)


def build_pipeline(arch: str, out: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write a diffusers pipeline folder of architecture ``sd15`` / ``sdxl`` and size ``tiny`` / ``full``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if arch not in TINY_CONFIGS:
        raise ValueError(f"arch must be one of {sorted(TINY_CONFIGS)}, got {arch!r}")
    spec = TINY_CONFIGS[arch] if size == "tiny" else FULL_CONFIGS[arch]
    dtype = torch.float32 if size == "tiny" else torch.float16  # full-size: as the released checkpoints
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator("cpu").manual_seed(seed)

    # 1. UNet and VAE with seeded weights (one at a time: a full-size SDXL UNet is 10 GB in fp32)
    unet = UNet2DConditionModel(**spec["unet"])
    _randomise(unet, generator)
    _save(unet, out / "unet", dtype)
    del unet
    vae = AutoencoderKL(**spec["vae"], scaling_factor=spec["scaling_factor"])
    _randomise(vae, generator)
    _save(vae, out / "vae", dtype)
    del vae

    # 2. tokenizer(s) and text encoder(s)
    index = {"_class_name": spec["pipeline"], "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for i, te_spec in enumerate(spec["text_encoders"]):
        suffix = "" if i == 0 else f"_{i + 1}"
        pad = "<|endoftext|>" if i == 0 else "!"
        vocab_size = write_clip_tokenizer(out / f"tokenizer{suffix}", pad_token=pad)
        vocab = json.loads((out / f"tokenizer{suffix}" / "vocab.json").read_text())
        te = _text_encoder(te_spec, spec.get("vocab_size") or vocab_size, vocab[pad], vocab["<|endoftext|>"],
                           vocab["<|startoftext|>"])
        _randomise(te, generator, std=0.02)
        _save(te, out / f"text_encoder{suffix}", dtype)
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        index[f"text_encoder{suffix}"] = ["transformers", type(te).__name__]
    if arch == "sd15":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=True)

    # 3. scheduler and model_index.json
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(_SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
