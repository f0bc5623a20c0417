"""LoRA parsing and low-rank deltas (CRAFT-LoRA Eq. 8, ``dW = alpha / rank * B @ A``).

Every common on-disk key layout is parsed from an in-memory state dict into per-module
factors keyed by the diffusers UNet module name:

* diffusers / PEFT: ``[base_model.model.|unet.]<module>.lora_A[.adapter].weight`` and
  ``lora_B``; alpha from ``<module>.alpha`` keys or a caller-given ``alphas`` mapping
  (PEFT keeps ``lora_alpha`` in its adapter config, not in the tensors);
* diffusers legacy attention processors: ``<attn>.processor.to_q_lora.down.weight``
  (``to_out_lora`` -> ``to_out.0``) and ``<module>.lora.down.weight`` / ``.lora.up``;
* kohya / A1111: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up`` +
  ``.alpha``, with diffusers module names or SGM / LDM block names (``input_blocks_4_1_...``)
  and dots written as underscores.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "LoraError",
    "LoraFactors",
    "LoraAdapter",
    "parse_lora",
    "detect_format",
    "lora_delta",
    "adapter_deltas",
]


class LoraError(ValueError):
    """A LoRA state dict that cannot be used on the given UNet."""


@dataclass(frozen=True)
class LoraFactors:
    """Low-rank factors of one module: ``dW = alpha / rank * B @ A``."""

    A: torch.Tensor  # (r, d_in) or (r, c_in, kh, kw)
    B: torch.Tensor  # (d_out, r) or (c_out, r, 1, 1)
    alpha: float
    rank: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoraAdapter:
    """A parsed LoRA: name, source format and factors keyed by UNet module name."""

    name: str
    format: str
    modules: Mapping[str, LoraFactors]

    @property
    def rank(self) -> int:
        return max((f.rank for f in self.modules.values()), default=0)


_PREFIXES = ("base_model.model.", "unet.")
_PEFT_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_PROC_RE = re.compile(
    r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj)"
    r"_lora\.(?P<ud>down|up)\.weight$"
)
_COMPAT_RE = re.compile(r"^(?P<mod>.+)\.lora\.(?P<ud>down|up)\.weight$")
_KOHYA_RE = re.compile(r"^lora_unet_(?P<mod>[A-Za-z0-9_]+)\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)$")
_TEXT_ENCODER_RE = re.compile(r"^(lora_te\d*_|text_encoder(_2)?\.|te\d?\.)")


def detect_format(keys: Iterable[str]) -> str:
    """Name the key layout of a LoRA state dict: ``peft``, ``diffusers-legacy`` or ``kohya``."""
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(".processor." in k or ".lora.down." in k or ".lora.up." in k for k in keys):
        return "diffusers-legacy"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    raise LoraError("unrecognised LoRA layout: no lora_A/lora_B, lora.down/lora.up or lora_unet_ keys found")


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _kohya_lookup(module_names: Iterable[str]) -> dict[str, str]:
    """Map kohya module names (dots written as ``_``) back to diffusers module names.

    Both spellings kohya uses are accepted: diffusers names (SD 1.5 trainers) and the
    original SGM / LDM names (``input_blocks_4_1_...``, SDXL trainers).
    """
    module_names = list(module_names)
    lookup: dict[str, str] = {}
    for name in module_names:
        lookup.setdefault(name.replace(".", "_"), name)
    for sgm, name in _sgm_names(module_names).items():
        lookup.setdefault(sgm.replace(".", "_"), name)
    return lookup


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


def _sgm_names(module_names: Sequence[str]) -> dict[str, str]:
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


def _group_factors(
    state_dict: Mapping[str, torch.Tensor], fmt: str, module_names: set[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Collect ``{module: {"A": down, "B": up}}`` and ``{module: alpha}`` from the keys."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    kohya = _kohya_lookup(module_names) if fmt == "kohya" else {}
    for raw_key, tensor in state_dict.items():
        key = _strip_prefix(raw_key)
        module, part = _classify_key(key, fmt, kohya, raw_key)
        if part == "alpha":
            alphas[module] = float(torch.as_tensor(tensor).float().reshape(-1)[0])
            continue
        groups.setdefault(module, {})[part] = tensor
    return groups, alphas


def _classify_key(key: str, fmt: str, kohya: Mapping[str, str], raw_key: str) -> tuple[str, str]:
    """Return (module name, "A" | "B" | "alpha") for one key of the given format."""
    if fmt == "kohya":
        m = _KOHYA_RE.match(key)
        if m is None:
            raise LoraError(f"LoRA key {raw_key!r} is not a kohya UNet key (lora_unet_<module>.lora_down/lora_up/alpha)")
        module = kohya.get(m["mod"])
        if module is None:
            raise LoraError(f"LoRA key {raw_key!r} maps to no module of this UNet")
        return module, {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}[m["kind"]]
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    if fmt == "peft" and (m := _PEFT_RE.match(key)):
        return m["mod"], m["ab"]
    if m := _PROC_RE.match(key):
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['attn']}.{proj}", "A" if m["ud"] == "down" else "B"
    if m := _COMPAT_RE.match(key):
        return m["mod"], "A" if m["ud"] == "down" else "B"
    raise LoraError(f"LoRA key {raw_key!r} is not a recognised {fmt} LoRA key")


def parse_lora(
    state_dict: Mapping[str, torch.Tensor],
    module_shapes: Mapping[str, tuple[int, ...]],
    *,
    name: str = "lora",
    alphas: Mapping[str, float] | float | None = None,
) -> LoraAdapter:
    """Parse a LoRA state dict into per-module factors checked against the UNet (Eq. 8 inputs).

    ``module_shapes`` maps every weight-bearing UNet module name to its weight shape.
    ``alphas`` (PEFT ``lora_alpha``): one number for all modules or a per-module mapping;
    ``<module>.alpha`` keys in the state dict take precedence. Default alpha = rank.
    """
    if not state_dict:
        raise LoraError(f"LoRA {name!r} is empty")
    for key in state_dict:
        if _TEXT_ENCODER_RE.match(key):
            raise LoraError(f"LoRA {name!r}: key {key!r} targets a text encoder; only UNet LoRAs are supported")
    fmt = detect_format(state_dict.keys())
    groups, key_alphas = _group_factors(state_dict, fmt, set(module_shapes))
    modules: dict[str, LoraFactors] = {}
    for module in sorted(groups):
        parts = groups[module]
        if module not in module_shapes:
            raise LoraError(f"LoRA {name!r}: module {module!r} is not a module of this UNet")
        if set(parts) != {"A", "B"}:
            missing = "up/B" if "B" not in parts else "down/A"
            raise LoraError(f"LoRA {name!r}: module {module!r} has no {missing} factor")
        A, B = parts["A"], parts["B"]
        rank = int(A.shape[0])
        alpha = key_alphas.get(module, _given_alpha(alphas, module, rank))
        _check_shapes(name, module, A, B, module_shapes[module])
        modules[module] = LoraFactors(A=A, B=B, alpha=float(alpha), rank=rank)
    stray = set(key_alphas) - set(groups)
    if stray:
        raise LoraError(f"LoRA {name!r}: alpha given for modules without factors: {sorted(stray)[:3]}")
    return LoraAdapter(name=name, format=fmt, modules=modules)


def _given_alpha(alphas: Mapping[str, float] | float | None, module: str, rank: int) -> float:
    if alphas is None:
        return float(rank)
    if isinstance(alphas, Mapping):
        return float(alphas.get(module, rank))
    return float(alphas)


def _check_shapes(name: str, module: str, A: torch.Tensor, B: torch.Tensor, target: tuple[int, ...]) -> None:
    """Refuse factors whose product cannot have the module's weight shape."""
    where = f"LoRA {name!r}: module {module!r}"
    if A.ndim not in (2, 4) or B.ndim not in (2, 4):
        raise LoraError(f"{where}: factors must be 2-D or 4-D, got A{tuple(A.shape)} B{tuple(B.shape)}")
    rank = A.shape[0]
    if B.shape[1] != rank:
        raise LoraError(f"{where}: rank mismatch, A{tuple(A.shape)} vs B{tuple(B.shape)}")
    if rank <= 0:
        raise LoraError(f"{where}: rank must be positive, got {rank}")
    if B.ndim == 4 and tuple(B.shape[2:]) != (1, 1):
        raise LoraError(f"{where}: up/B factor must be 1x1, got {tuple(B.shape)}")
    d_out = B.shape[0]
    d_in_numel = math.prod(A.shape[1:])
    if d_out != target[0] or d_in_numel != math.prod(target[1:]):
        raise LoraError(
            f"{where}: delta of shape ({d_out}, {d_in_numel}) does not fit weight {tuple(target)} "
            f"(A{tuple(A.shape)} B{tuple(B.shape)})"
        )
    if len(target) == 4 and A.ndim == 4 and tuple(A.shape[1:]) != tuple(target[1:]):
        raise LoraError(f"{where}: conv factor A{tuple(A.shape)} does not match weight {tuple(target)}")


def lora_delta(
    factors: LoraFactors,
    target_shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    adapter: str = "lora",
    module: str = "?",
) -> torch.Tensor:
    """Low-rank update ``dW = alpha / rank * B @ A`` in fp32, reshaped to the weight (Eq. 8)."""
    A = factors.A.detach().to(torch.float32)
    B = factors.B.detach().to(torch.float32)
    delta = B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)  # (d_out, d_in * kh * kw)
    delta = (delta * factors.scale).reshape(target_shape)
    if not torch.isfinite(delta).all():
        raise LoraError(f"LoRA {adapter!r}: non-finite delta for module {module!r}")
    return delta.to(dtype)


def adapter_deltas(
    adapter: LoraAdapter,
    module_shapes: Mapping[str, tuple[int, ...]],
    modules: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """fp32 deltas of every (or the selected) module of an adapter, keyed by module name."""
    wanted = adapter.modules.keys() if modules is None else [m for m in modules if m in adapter.modules]
    return {
        m: lora_delta(adapter.modules[m], tuple(module_shapes[m]), adapter=adapter.name, module=m)
        for m in wanted
    }
