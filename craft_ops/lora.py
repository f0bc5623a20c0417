"""LoRA parsing and low-rank deltas (CRAFT-LoRA Eq. 8, ``dW = alpha / rank * B @ A``).

Every common on-disk key layout is parsed from an in-memory state dict into per-module
factors keyed by the diffusers UNet module name:

* diffusers / PEFT: ``[base_model.model.|unet.]<module>.lora_A[.adapter].weight`` and
  ``lora_B``; alpha from ``<module>.alpha`` keys or a caller-given ``alphas`` mapping
  (PEFT keeps ``lora_alpha`` in its adapter config, not in the tensors); DoRA magnitudes
  ``<module>.lora_magnitude_vector[.adapter][.weight]``;
* diffusers legacy attention processors: ``<attn>.processor.to_q_lora.down.weight``
  (``to_out_lora`` -> ``to_out.0``) and ``<module>.lora.down.weight`` / ``.lora.up``;
* kohya / A1111 / LyCORIS: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up`` +
  ``.alpha`` (a missing or zero alpha means ``alpha = rank``, as kohya and LyCORIS read it),
  ``.lora_mid.weight`` (Tucker LoCon), ``.dora_scale`` (DoRA), LoHa ``.hada_*``, LoKr
  ``.lokr_*`` and full ``.diff``, with diffusers module names or SGM / LDM block names
  (``input_blocks_4_1_...``) and dots written as underscores.

Adapters other than plain LoRA are described, with their formulas, in :mod:`.adapters`;
each bakes into a plain ``dW``. DoRA needs the base weight: :func:`bake_adapter`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

from .lazy import torch

from .adapters import LYCORIS_PARTS, AdapterShapeError, BakedDelta, build_lycoris, wrap_dora
from .sgm_names import sgm_names

__all__ = [
    "LoraError",
    "LoraFactors",
    "LoraAdapter",
    "parse_lora",
    "detect_format",
    "lora_delta",
    "adapter_deltas",
    "bake_adapter",
]


class LoraError(ValueError):
    """A LoRA state dict that cannot be used on the given UNet."""


@dataclass(frozen=True)
class LoraFactors:
    """Low-rank factors of one module: ``dW = alpha / rank * B @ A`` (Tucker LoCon: ``B, mid, A``)."""

    A: torch.Tensor  # (r, d_in) or (r, c_in, kh, kw); (r, c_in, 1, 1) with mid
    B: torch.Tensor  # (d_out, r) or (c_out, r, 1, 1)
    alpha: float
    rank: int
    mid: torch.Tensor | None = None  # (r, r, kh, kw) Tucker core (LyCORIS lora_mid)
    kind: ClassVar[str] = "lora"
    needs_base: ClassVar[bool] = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self, target: tuple[int, ...]) -> None:
        _check_shapes(self.A, self.B, target, self.mid)

    def delta(self, target: tuple[int, ...]) -> torch.Tensor:
        A = self.A.detach().to(torch.float32)
        B = self.B.detach().to(torch.float32)
        if self.mid is not None:
            mid = self.mid.detach().to(torch.float32)
            delta = torch.einsum("m n ..., i m, n j -> i j ...", mid, B.reshape(B.shape[0], -1),
                                 A.reshape(A.shape[0], -1))
            return (delta * self.scale).reshape(target)
        delta = B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)  # (d_out, d_in * kh * kw)
        return (delta * self.scale).reshape(target)


@dataclass(frozen=True)
class LoraAdapter:
    """A parsed LoRA: name, source format and per-module factors keyed by UNet module name.

    Module values are :class:`LoraFactors` or one of the :mod:`.adapters` types; every one
    has ``kind``, ``rank``, ``needs_base`` and ``delta(shape)``.
    """

    name: str
    format: str
    modules: Mapping[str, object]

    @property
    def rank(self) -> int:
        return max((f.rank for f in self.modules.values()), default=0)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Adapter types present (``lora``, ``loha``, ``lokr``, ``full``, ``dora``), sorted."""
        return tuple(sorted({f.kind for f in self.modules.values()}))

    @property
    def needs_base(self) -> bool:
        """True while DoRA modules wait to be baked against the base weights."""
        return any(f.needs_base for f in self.modules.values())

    @property
    def low_rank_only(self) -> bool:
        """Only plain LoRA factors: what a runtime (unbaked) LoRA engine can take."""
        return all(isinstance(f, LoraFactors) for f in self.modules.values())


_PREFIXES = ("base_model.model.", "unet.")
_PEFT_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_MAGNITUDE_RE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_]+)?$")
_PROC_RE = re.compile(
    r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj)"
    r"_lora\.(?P<ud>down|up)\.weight$"
)
_COMPAT_RE = re.compile(r"^(?P<mod>.+)\.lora\.(?P<ud>down|up)\.weight$")
_KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "lora_mid.weight": "mid", "alpha": "alpha",
                "dora_scale": "dora_scale", **{p: p for p in LYCORIS_PARTS}}
_KOHYA_RE = re.compile(r"^lora_unet_(?P<mod>[A-Za-z0-9_]+)\.(?P<kind>%s)$"
                       % "|".join(re.escape(k) for k in sorted(_KOHYA_PARTS, key=len, reverse=True)))
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
    for sgm, name in sgm_names(module_names).items():
        lookup.setdefault(sgm.replace(".", "_"), name)
    return lookup


def _group_factors(
    state_dict: Mapping[str, torch.Tensor], fmt: str, module_names: set[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Collect ``{module: {part: tensor}}`` and ``{module: alpha}`` from the keys."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    kohya = _kohya_lookup(module_names) if fmt == "kohya" else {}
    for raw_key, tensor in state_dict.items():
        key = _strip_prefix(raw_key)
        module, part = _classify_key(key, fmt, kohya, raw_key)
        if part == "alpha":
            alphas[module] = float(tensor.reshape(-1)[0])  # a torch tensor or a numpy array
            continue
        groups.setdefault(module, {})[part] = tensor
    return groups, alphas


def _classify_key(key: str, fmt: str, kohya: Mapping[str, str], raw_key: str) -> tuple[str, str]:
    """Return (module name, part) for one key of the given format.

    Parts: ``A`` / ``B`` / ``mid`` / ``alpha`` (LoRA), ``magnitude`` (PEFT DoRA),
    ``dora_scale`` (kohya DoRA) or a LyCORIS tensor name (``hada_w1_a``, ``lokr_w1``, ``diff``...).
    """
    if fmt == "kohya":
        m = _KOHYA_RE.match(key)
        if m is None:
            raise LoraError(f"LoRA key {raw_key!r} is not a kohya UNet key (lora_unet_<module>. + one of "
                            f"lora_down/lora_up/lora_mid.weight, alpha, dora_scale, hada_*, lokr_*, diff)")
        module = kohya.get(m["mod"])
        if module is None:
            raise LoraError(f"LoRA key {raw_key!r} maps to no module of this UNet")
        return module, _KOHYA_PARTS[m["kind"]]
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    if fmt == "peft" and (m := _PEFT_RE.match(key)):
        return m["mod"], m["ab"]
    if fmt == "peft" and (m := _MAGNITUDE_RE.match(key.removesuffix(".weight"))):
        return m["mod"], "magnitude"
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
    modules: dict[str, object] = {}
    for module in sorted(groups):
        if module not in module_shapes:
            raise LoraError(f"LoRA {name!r}: module {module!r} is not a module of this UNet")
        target = tuple(module_shapes[module])
        alpha = key_alphas.get(module)
        if fmt == "kohya" and alpha == 0:
            alpha = None  # kohya / LyCORIS: alpha 0 means alpha = rank
        try:
            modules[module] = _build_module(groups[module], alpha, alphas, module, target)
        except AdapterShapeError as exc:
            raise LoraError(f"LoRA {name!r}: module {module!r}: {exc}") from exc
    stray = set(key_alphas) - set(groups)
    if stray:
        raise LoraError(f"LoRA {name!r}: alpha given for modules without factors: {sorted(stray)[:3]}")
    return LoraAdapter(name=name, format=fmt, modules=modules)


def _build_module(parts: Mapping[str, torch.Tensor], key_alpha: float | None,
                  alphas: Mapping[str, float] | float | None, module: str, target: tuple[int, ...]):
    """One module's adapter from its parts: LoRA (+ Tucker mid), LoHa, LoKr or full, each maybe DoRA."""
    parts = dict(parts)
    dora = [(parts.pop(k), k == "magnitude") for k in ("magnitude", "dora_scale") if k in parts]
    if set(parts) & LYCORIS_PARTS:
        extra = set(parts) - LYCORIS_PARTS
        if extra:
            raise AdapterShapeError(f"mixes LyCORIS tensors with {sorted(extra)}")
        inner = build_lycoris(parts, key_alpha)
    else:
        if not {"A", "B"} <= set(parts):
            missing = "up/B" if "B" not in parts else "down/A"
            raise AdapterShapeError(f"has no {missing} factor")
        A, B = parts["A"], parts["B"]
        rank = int(A.shape[0])
        alpha = key_alpha if key_alpha is not None else _given_alpha(alphas, module, rank)
        inner = LoraFactors(A=A, B=B, alpha=float(alpha), rank=rank, mid=parts.get("mid"))
    inner.check(target)
    if not dora:
        return inner
    if len(dora) > 1:
        raise AdapterShapeError("has both lora_magnitude_vector and dora_scale")
    scale, peft = dora[0]
    return wrap_dora(inner, scale, target, peft=peft)


def _given_alpha(alphas: Mapping[str, float] | float | None, module: str, rank: int) -> float:
    if alphas is None:
        return float(rank)
    if isinstance(alphas, Mapping):
        return float(alphas.get(module, rank))
    return float(alphas)


def _check_shapes(A: torch.Tensor, B: torch.Tensor, target: tuple[int, ...], mid: torch.Tensor | None = None) -> None:
    """Refuse factors whose product cannot have the module's weight shape."""
    if A.ndim not in (2, 4) or B.ndim not in (2, 4):
        raise AdapterShapeError(f"factors must be 2-D or 4-D, got A{tuple(A.shape)} B{tuple(B.shape)}")
    rank = A.shape[0]
    if rank <= 0:
        raise AdapterShapeError(f"rank must be positive, got {rank}")
    if B.ndim == 4 and tuple(B.shape[2:]) != (1, 1):
        raise AdapterShapeError(f"up/B factor must be 1x1, got {tuple(B.shape)}")
    if mid is not None:
        fits = (len(target) == 4 and mid.ndim == 4 and tuple(mid.shape[:2]) == (B.shape[1], rank)
                and math.prod(A.shape) == rank * target[1] and tuple(mid.shape[2:]) == tuple(target[2:])
                and B.shape[0] == target[0])
        if not fits:
            raise AdapterShapeError(f"Tucker factors up{tuple(B.shape)} mid{tuple(mid.shape)} down{tuple(A.shape)} "
                                    f"do not make weight {tuple(target)}")
        return
    if B.shape[1] != rank:
        raise AdapterShapeError(f"rank mismatch, A{tuple(A.shape)} vs B{tuple(B.shape)}")
    d_out = B.shape[0]
    d_in_numel = math.prod(A.shape[1:])
    if d_out != target[0] or d_in_numel != math.prod(target[1:]):
        raise AdapterShapeError(
            f"delta of shape ({d_out}, {d_in_numel}) does not fit weight {tuple(target)} "
            f"(A{tuple(A.shape)} B{tuple(B.shape)})"
        )
    if len(target) == 4 and A.ndim == 4 and tuple(A.shape[1:]) != tuple(target[1:]):
        raise AdapterShapeError(f"conv factor A{tuple(A.shape)} does not match weight {tuple(target)}")


def lora_delta(
    factors,
    target_shape: tuple[int, ...],
    *,
    dtype: torch.dtype | None = None,
    adapter: str = "lora",
    module: str = "?",
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """A module's ``dW`` in ``dtype`` (default fp32), reshaped to the weight (Eq. 8); ``base`` (W_init) for DoRA."""
    try:
        delta = factors.delta(target_shape, base) if factors.needs_base else factors.delta(target_shape)
    except AdapterShapeError as exc:
        raise LoraError(f"LoRA {adapter!r}: module {module!r}: {exc}") from exc
    if not torch.isfinite(delta).all():
        raise LoraError(f"LoRA {adapter!r}: non-finite delta for module {module!r}")
    return delta.to(torch.float32 if dtype is None else dtype)


def adapter_deltas(
    adapter: LoraAdapter,
    module_shapes: Mapping[str, tuple[int, ...]],
    modules: Iterable[str] | None = None,
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """fp32 deltas of every (or the selected) module of an adapter, keyed by module name.

    ``weights`` (module -> W_init) is needed only while the adapter has unbaked DoRA modules.
    """
    wanted = adapter.modules.keys() if modules is None else [m for m in modules if m in adapter.modules]
    return {
        m: lora_delta(adapter.modules[m], tuple(module_shapes[m]), adapter=adapter.name, module=m,
                      base=None if weights is None else weights.get(m))
        for m in wanted
    }


def bake_adapter(adapter: LoraAdapter, weights: Mapping[str, torch.Tensor]) -> LoraAdapter:
    """Turn DoRA modules into fixed deltas against ``weights`` (module -> the W_init they apply to).

    Other modules are kept as they are; an adapter without DoRA is returned unchanged.
    """
    if not adapter.needs_base:
        return adapter
    modules = dict(adapter.modules)
    for m, f in adapter.modules.items():
        if not f.needs_base:
            continue
        if m not in weights:
            raise LoraError(f"LoRA {adapter.name!r}: no base weight for DoRA module {m!r}")
        W = weights[m]
        delta = lora_delta(f, tuple(W.shape), adapter=adapter.name, module=m, base=W)
        modules[m] = BakedDelta(delta, f.kind, f.rank)
    return replace(adapter, modules=modules)
