"""Every network's export contract (:class:`~craft_export.specs.NetworkSpec`), derived from the configs.

Widths, sequence lengths, latent scale and SDXL's pooled / time-id sizes are read from the
UNet, VAE and text encoder configs of a pipeline (a folder, a loaded pipeline or a mapping),
and checked against each other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .specs import ARCHES, NetworkSpec, TensorSpec

__all__ = ["network_specs"]

def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config not found: {path}") from None


def _configs_from(source: Any, arch: str) -> dict[str, Any]:
    """{"unet", "vae", "text_encoder", "text_encoder_2"} -> config (dict or config object)."""
    names = ["text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    if isinstance(source, (str, Path)):
        root = Path(source)
        return {"unet": _read_json(root / "unet" / "config.json"),
                "vae": _read_json(root / "vae" / "config.json"),
                **{n: _read_json(root / n / "config.json") for n in names}}
    if isinstance(source, Mapping):
        return dict(source)
    # a loaded pipeline (diffusers pipeline or craft_export.loading.PipelineParts)
    out = {"unet": source.unet.config, "vae": source.vae.config}
    encoders = getattr(source, "text_encoders", None)
    if encoders is None:
        encoders = [getattr(source, n) for n in names]
    for n, enc in zip(names, encoders):
        out[n] = enc.config
    return out


def network_specs(arch: str, source: Any, *, max_batch: int = 8) -> dict[str, NetworkSpec]:
    """The spec of every network of an ``sd15`` / ``sdxl`` pipeline, keyed by kind.

    ``source`` is a diffusers pipeline folder, a loaded pipeline (anything with ``.unet``,
    ``.vae`` and ``.text_encoders`` or ``.text_encoder[_2]``), or a mapping of configs
    ``{"unet": ..., "vae": ..., "text_encoder": ..., "text_encoder_2": ...}``. Widths come
    from the configs: context width D = UNet ``cross_attention_dim`` (checked against the
    text encoders' hidden sizes), pooled width P = ``projection_class_embeddings_input_dim
    - n_time_ids * addition_time_embed_dim`` (checked against ``text_encoder_2``'s
    ``projection_dim``), sequence length = the encoders' ``max_position_embeddings``.
    """
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    cfgs = _configs_from(source, arch)
    unet, vae = cfgs["unet"], cfgs["vae"]
    is_sdxl = _get(unet, "addition_embed_type") == "text_time"
    if is_sdxl != (arch == "sdxl"):
        raise ValueError(f"UNet config is {'SDXL' if is_sdxl else 'not SDXL'} "
                         f"(addition_embed_type={_get(unet, 'addition_embed_type')!r}) but arch={arch!r}")

    latent_scale = 2 ** (len(_get(vae, "block_out_channels")) - 1)
    latent_ch = int(_get(vae, "latent_channels", 4))
    unet_in, unet_out = int(_get(unet, "in_channels")), int(_get(unet, "out_channels"))
    if unet_in != latent_ch:
        raise ValueError(f"UNet in_channels {unet_in} != VAE latent_channels {latent_ch}")
    D = _get(unet, "cross_attention_dim")
    if not isinstance(D, int):
        raise ValueError(f"per-block cross_attention_dim {D!r} is not supported")

    enc_names = ["text_encoder"] + (["text_encoder_2"] if is_sdxl else [])
    encs = [cfgs.get(n) for n in enc_names]
    seq = {int(_get(e, "max_position_embeddings", 77)) for e in encs if e is not None} or {77}
    if len(seq) != 1:
        raise ValueError(f"text encoders disagree on sequence length: {seq}")
    L = seq.pop()
    widths = [_get(e, "hidden_size") for e in encs]
    if all(w is not None for w in widths) and sum(widths) != D:
        raise ValueError(f"text encoder widths {widths} don't add up to UNet cross_attention_dim {D}")

    common = dict(arch=arch, max_batch=max_batch, latent_scale=latent_scale)
    specs: dict[str, NetworkSpec] = {}

    unet_inputs = [
        TensorSpec("sample", "FP32", ("B", unet_in, "h", "w")),
        TensorSpec("timestep", "FP32", ("B",)),
        TensorSpec("encoder_hidden_states", "FP32", ("B", L, D)),
    ]
    unet_meta: dict[str, Any] = {"num_upsamplers": len(_get(unet, "up_block_types")) - 1}
    if is_sdxl:
        time_dim = int(_get(unet, "addition_time_embed_dim"))
        proj_in = int(_get(unet, "projection_class_embeddings_input_dim"))
        te2 = cfgs.get("text_encoder_2")
        P = _get(te2, "projection_dim")
        if P is None:
            n_time_ids = 6
            P = proj_in - n_time_ids * time_dim
        else:
            P = int(P)
            n_time_ids, rem = divmod(proj_in - P, time_dim)
            if rem or n_time_ids < 1:
                raise ValueError(f"projection_class_embeddings_input_dim {proj_in} != "
                                 f"text_encoder_2.projection_dim {P} + n * addition_time_embed_dim {time_dim}")
        unet_inputs += [TensorSpec("text_embeds", "FP32", ("B", P)),
                        TensorSpec("time_ids", "FP32", ("B", n_time_ids))]
        unet_meta.update(pooled_dim=P, n_time_ids=n_time_ids)
    specs["unet"] = NetworkSpec("unet", inputs=tuple(unet_inputs),
                                outputs=(TensorSpec("noise_pred", "FP32", ("B", unet_out, "h", "w")),),
                                meta=unet_meta, **common)

    for i, (name, enc) in enumerate(zip(enc_names, encs)):
        if enc is None:
            raise ValueError(f"{arch} needs a {name} config")
        width = int(_get(enc, "hidden_size"))
        outputs = [TensorSpec("hidden_states", "FP32", ("B", L, width))]
        pooled = is_sdxl and i == 1
        if pooled:
            outputs.append(TensorSpec("text_embeds", "FP32", ("B", int(_get(enc, "projection_dim")))))
        meta = {"vocab_size": int(_get(enc, "vocab_size")),
                "bos_token_id": _get(enc, "bos_token_id"), "eos_token_id": _get(enc, "eos_token_id"),
                "pad_token_id": _get(enc, "pad_token_id"),
                "penultimate": is_sdxl, "pooled": pooled}
        specs[name] = NetworkSpec(name, inputs=(TensorSpec("input_ids", "INT64", ("B", L)),),
                                  outputs=tuple(outputs), meta=meta, **common)

    out_ch = int(_get(vae, "out_channels", 3))
    specs["vae_decoder"] = NetworkSpec(
        "vae_decoder",
        inputs=(TensorSpec("latent", "FP32", ("B", latent_ch, "h", "w")),),
        outputs=(TensorSpec("image", "FP32", ("B", out_ch, f"{latent_scale}*h", f"{latent_scale}*w")),),
        meta={"scaling_factor": float(_get(vae, "scaling_factor", 0.18215))}, **common)
    return specs
