"""SGM / LDM module names of a diffusers UNet (``input_blocks.4.1`` <-> ``down_blocks.1.attentions.0``).

kohya's SDXL trainers and the original single-file checkpoints name UNet modules the way
the SGM / LDM code does; this maps every diffusers module name of a UNet to that spelling,
from the UNet's own module list (so any block layout, tiny or full-size, maps correctly).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["sgm_names"]


_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_TOP_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _count(names: Sequence[str], prefix: str) -> int:
    """How many numbered children ``prefix.<i>`` exist."""
    idx = {int(n[len(prefix) + 1:].split(".")[0]) for n in names if n.startswith(prefix + ".")}
    return max(idx) + 1 if idx else 0


def _sgm_block_map(names: Sequence[str]) -> dict[str, str]:
    """diffusers block prefix -> SGM block prefix (``down_blocks.1.attentions.0`` -> ``input_blocks.4.1``)."""
    blocks: dict[str, str] = {}
    idx = 1
    for b in range(_count(names, "down_blocks")):
        for l in range(_count(names, f"down_blocks.{b}.resnets")):
            blocks[f"down_blocks.{b}.resnets.{l}"] = f"input_blocks.{idx}.0"
            blocks[f"down_blocks.{b}.attentions.{l}"] = f"input_blocks.{idx}.1"
            idx += 1
        if _count(names, f"down_blocks.{b}.downsamplers"):
            blocks[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
    blocks.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                   "mid_block.resnets.1": "middle_block.2"})
    idx = 0
    for b in range(_count(names, "up_blocks")):
        has_attn = _count(names, f"up_blocks.{b}.attentions") > 0
        n = _count(names, f"up_blocks.{b}.resnets")
        for l in range(n):
            blocks[f"up_blocks.{b}.resnets.{l}"] = f"output_blocks.{idx}.0"
            blocks[f"up_blocks.{b}.attentions.{l}"] = f"output_blocks.{idx}.1"
            if l == n - 1 and _count(names, f"up_blocks.{b}.upsamplers"):
                blocks[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{idx}.{1 + has_attn}.conv"
            idx += 1
    return blocks


def sgm_names(module_names: Sequence[str]) -> dict[str, str]:
    """SGM / LDM module name -> diffusers module name for the UNet's modules."""
    names = list(module_names)
    blocks = _sgm_block_map(names)
    out: dict[str, str] = {}
    for name in names:
        if name in _TOP_SGM:
            out[_TOP_SGM[name]] = name
            continue
        for prefix, sgm in blocks.items():
            if name == prefix:
                out[sgm] = name
            elif name.startswith(prefix + "."):
                rest = name[len(prefix) + 1:]
                out[f"{sgm}.{_RESNET_SGM.get(rest, rest)}"] = name
    return out
