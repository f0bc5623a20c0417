"""The public full-size SD 1.5 / SDXL architectures as diffusers / transformers arguments.

Configs only, no weights (shared/REFERENCE-ARCHITECTURES.md): the GPU benchmark builds
random-weight models from them (timing does not depend on the values), and the export and
training benchmarks use the SDXL UNet. Tiny demo models live in :mod:`.tiny`.
"""

from __future__ import annotations

__all__ = ["CLIP_BIGG", "CLIP_L", "CLIP_TOKENS", "SCHEDULER_CONFIG", "UNET_CONFIGS", "VAE_CONFIG", "VAE_SCALING",
           "spec_configs"]

UNET_CONFIGS: dict[str, dict] = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                  block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4)
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}
# CLIP ViT-L/14 (SD 1.5, SDXL text_encoder) and OpenCLIP ViT-bigG/14 (SDXL text_encoder_2).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)
# Vocabulary and token ids of the CLIP BPE tokenizer; the pad id is the tokenizer's
# (``<|endoftext|>`` for tokenizer, ``!`` for SDXL's tokenizer_2).
CLIP_TOKENS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
PAD_TOKEN_ID = {"text_encoder": 49407, "text_encoder_2": 0}
SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                    "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False}


def spec_configs(arch: str) -> dict[str, dict]:
    """The configs :func:`craft_export.specs.network_specs` reads, for the full-size ``arch``."""
    if arch not in UNET_CONFIGS:
        raise ValueError(f"arch {arch!r}: expected one of {sorted(UNET_CONFIGS)}")
    encoders = {"text_encoder": CLIP_L} | ({"text_encoder_2": CLIP_BIGG} if arch == "sdxl" else {})
    configs = {"unet": dict(UNET_CONFIGS[arch]), "vae": dict(VAE_CONFIG, scaling_factor=VAE_SCALING[arch])}
    for name, enc in encoders.items():
        configs[name] = dict(enc, **CLIP_TOKENS, pad_token_id=PAD_TOKEN_ID[name])
    return configs
