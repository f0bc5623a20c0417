"""Adapter module types beyond plain LoRA, each baked into a plain ``dW`` (the Delta W of Eq. 8).

Every type reduces to one fp32 tensor of the weight's shape, so routing (Eq. 7), gates
(Eq. 9), aggregation (Eq. 8), export and serving treat them exactly like a LoRA delta. The
formulas and their sources (``r`` is the rank, ``scale`` multiplies the product once):

* **LoRA / LoCon** (kohya sd-scripts, PEFT): ``dW = alpha / r * up @ down``; a 3x3 conv
  LoRA has ``down`` (r, c_in, kh, kw) and ``up`` (c_out, r, 1, 1).
  Tucker LoCon (LyCORIS ``lora_mid``): ``dW = alpha / r * einsum(mid, up, down)``.
* **LoHa** (LyCORIS ``hada_*``, PEFT ``LoHaConfig``):
  ``dW = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product); with Tucker cores
  ``hada_t1/t2`` (conv): ``rebuild_i = einsum("ijkl,jr,ip->prkl", t_i, w_i_b, w_i_a)``.
* **LoKr** (LyCORIS ``lokr_*``, PEFT ``LoKrConfig``): ``dW = scale * kron(w1, w2)`` with
  ``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``, ``w2 = lokr_w2``, ``lokr_w2_a @ lokr_w2_b``
  or the Tucker ``einsum("ijkl,ip,jr->prkl", lokr_t2, lokr_w2_a, lokr_w2_b)``. ``scale =
  alpha / r`` with ``r`` the rank of the decomposed factor; when ``w1`` and ``w2`` are both
  full matrices LyCORIS fixes ``scale = 1`` whatever the alpha (PEFT, which always has an
  ``r``, uses ``alpha / r``: a PEFT config with ``alpha = r`` is the same adapter).
* **full** (LyCORIS ``diff``): ``dW = diff``. A bias delta ``diff_b`` is accepted only when
  it is all zeros: baked variants change weights, never biases.
* **DoRA** (PEFT ``lora_magnitude_vector``, LyCORIS/kohya ``dora_scale``), around any of the
  above: ``V = W + dW_inner``, ``W' = m / ||V|| * V``, ``dW = W' - W``. ``||V||`` is the L2
  norm of each output row over all other axes, exactly as PEFT's ``get_weight_norm`` and
  ``merge`` compute it (no epsilon; LyCORIS adds ``finfo(fp32).eps`` to the norm, a relative
  difference below 1e-7). LyCORIS files trained with ``wd_on_out=False`` store ``dora_scale``
  as (1, c_in, ...): the norm is then taken per input column. ``W`` is the weight the delta
  is *applied to* (the pipeline's W_init), as PEFT computes the norm from the layer it is
  attached to at inference time; a DoRA adapter therefore cannot be baked from shapes alone
  (:func:`bake_adapter`). With a gate ``gamma < 1`` the baked ``gamma * dW`` interpolates
  linearly between W_init and the DoRA weight (Eq. 8), which is not what PEFT's adapter
  weight or LyCORIS's multiplier do below 1; at ``gamma = 1`` all three agree.

The LyCORIS merge helpers (``get_diff_weight``) multiply by ``scale`` a second time; the
training forward, PEFT, ComfyUI and A1111 apply it once, as here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .lazy import torch

__all__ = [
    "AdapterShapeError",
    "LohaFactors",
    "LokrFactors",
    "FullDelta",
    "DoraFactors",
    "BakedDelta",
    "dora_weight",
    "build_lycoris",
    "wrap_dora",
    "ADAPTER_KINDS",
]

ADAPTER_KINDS = ("lora", "loha", "lokr", "full", "dora")


class AdapterShapeError(ValueError):
    """Factors whose product cannot have the module's weight shape (re-raised as LoraError)."""


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


@dataclass(frozen=True)
class LohaFactors:
    """LyCORIS LoHa: Hadamard product of two low-rank products, ``alpha / r`` applied once."""

    w1_a: torch.Tensor  # (out, r), or (r, out) with Tucker
    w1_b: torch.Tensor  # (r, in * k), or (r, in) with Tucker
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    rank: int
    t1: torch.Tensor | None = None  # (r, r, kh, kw) Tucker cores (conv)
    t2: torch.Tensor | None = None
    kind: ClassVar[str] = "loha"
    needs_base: ClassVar[bool] = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self, target: tuple[int, ...]) -> None:
        if self.t1 is not None:
            for t, a, b in ((self.t1, self.w1_a, self.w1_b), (self.t2, self.w2_a, self.w2_b)):
                shape = (a.shape[1], b.shape[1], *t.shape[2:])
                if t.ndim != 4 or a.ndim != 2 or b.ndim != 2 or t.shape[:2] != (a.shape[0], b.shape[0]) \
                        or shape != tuple(target):
                    raise AdapterShapeError(f"Tucker LoHa factors t{tuple(t.shape)} a{tuple(a.shape)} "
                                            f"b{tuple(b.shape)} do not make weight {tuple(target)}")
            return
        for a, b in ((self.w1_a, self.w1_b), (self.w2_a, self.w2_b)):
            if a.ndim != 2 or a.shape[1] != b.shape[0] or (a.shape[0], math.prod(b.shape[1:])) != _flat(target):
                raise AdapterShapeError(f"LoHa factors a{tuple(a.shape)} b{tuple(b.shape)} do not make "
                                        f"weight {tuple(target)}")

    def delta(self, target: tuple[int, ...]) -> torch.Tensor:
        if self.t1 is not None:
            r1 = torch.einsum("i j k l, j r, i p -> p r k l", _f32(self.t1), _f32(self.w1_b), _f32(self.w1_a))
            r2 = torch.einsum("i j k l, j r, i p -> p r k l", _f32(self.t2), _f32(self.w2_b), _f32(self.w2_a))
        else:
            r1 = _f32(self.w1_a) @ _f32(self.w1_b).reshape(self.w1_b.shape[0], -1)
            r2 = _f32(self.w2_a) @ _f32(self.w2_b).reshape(self.w2_b.shape[0], -1)
        return (r1 * r2 * self.scale).reshape(target)


@dataclass(frozen=True)
class LokrFactors:
    """LyCORIS LoKr: Kronecker product of a small and a (possibly low-rank) large factor."""

    w1: torch.Tensor | None  # (a, c) full, or None with w1_a (a, r) @ w1_b (r, c)
    w1_a: torch.Tensor | None
    w1_b: torch.Tensor | None
    w2: torch.Tensor | None  # (b, d[, kh, kw]) full, or None with w2_a @ w2_b / Tucker t2
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    t2: torch.Tensor | None
    alpha: float
    rank: int
    kind: ClassVar[str] = "lokr"
    needs_base: ClassVar[bool] = False

    @property
    def full_rank(self) -> bool:
        return self.w1 is not None and self.w2 is not None

    @property
    def scale(self) -> float:
        return 1.0 if self.full_rank else self.alpha / self.rank

    def _w1(self) -> torch.Tensor:  # (a, c)
        return _f32(self.w1) if self.w1 is not None else _f32(self.w1_a) @ _f32(self.w1_b)

    def _w2_shape(self) -> tuple[int, int]:
        if self.w2 is not None:
            return _flat(tuple(self.w2.shape))
        if self.t2 is not None:
            return self.w2_a.shape[1], self.w2_b.shape[1] * math.prod(self.t2.shape[2:])
        return self.w2_a.shape[0], math.prod(self.w2_b.shape[1:])

    def _w2(self) -> torch.Tensor:  # (b, d * kh * kw)
        if self.w2 is not None:
            return _f32(self.w2).reshape(self.w2.shape[0], -1)
        if self.t2 is not None:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", _f32(self.t2), _f32(self.w2_a), _f32(self.w2_b))
            return w2.reshape(w2.shape[0], -1)
        return _f32(self.w2_a) @ _f32(self.w2_b).reshape(self.w2_b.shape[0], -1)

    def check(self, target: tuple[int, ...]) -> None:
        a, c = tuple(self.w1.shape) if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])
        if self.w1 is None and self.w1_a.shape[1] != self.w1_b.shape[0]:
            raise AdapterShapeError(f"LoKr w1_a{tuple(self.w1_a.shape)} w1_b{tuple(self.w1_b.shape)} rank mismatch")
        b, dk = self._w2_shape()
        if (a * b, c * dk) != _flat(target):
            raise AdapterShapeError(f"LoKr kron of ({a}, {c}) and ({b}, {dk}) does not make weight {tuple(target)}")
        if self.t2 is not None and (len(target) != 4 or tuple(self.t2.shape[2:]) != tuple(target[2:])):
            raise AdapterShapeError(f"LoKr Tucker core {tuple(self.t2.shape)} does not fit weight {tuple(target)}")

    def delta(self, target: tuple[int, ...]) -> torch.Tensor:
        return (torch.kron(self._w1(), self._w2()) * self.scale).reshape(target)


@dataclass(frozen=True)
class FullDelta:
    """LyCORIS full fine-tune: the stored tensor is ``dW`` itself."""

    diff: torch.Tensor
    kind: ClassVar[str] = "full"
    needs_base: ClassVar[bool] = False

    @property
    def rank(self) -> int:
        return min(_flat(tuple(self.diff.shape)))

    def check(self, target: tuple[int, ...]) -> None:
        if math.prod(self.diff.shape) != math.prod(target) or self.diff.shape[0] != target[0]:
            raise AdapterShapeError(f"diff {tuple(self.diff.shape)} does not fit weight {tuple(target)}")

    def delta(self, target: tuple[int, ...]) -> torch.Tensor:
        return _f32(self.diff).reshape(target)


def dora_weight(base: torch.Tensor, inner_delta: torch.Tensor, magnitude: torch.Tensor, axis: str) -> torch.Tensor:
    """The DoRA weight ``m / ||W + dW|| * (W + dW)`` in fp32 (PEFT's merge; norm per output row).

    ``axis="in"``: LyCORIS ``wd_on_out=False`` files, norm per input column.
    """
    V = _f32(base) + inner_delta
    if axis == "out":
        norm = V.reshape(V.shape[0], -1).norm(p=2, dim=1)
        factor = _f32(magnitude).reshape(-1) / norm
        return factor.view(-1, *(1,) * (V.ndim - 1)) * V
    norm = V.transpose(0, 1).reshape(V.shape[1], -1).norm(p=2, dim=1)
    factor = _f32(magnitude).reshape(-1) / norm
    return factor.view(1, -1, *(1,) * (V.ndim - 2)) * V


@dataclass(frozen=True)
class DoraFactors:
    """Weight-decomposed adapter: a magnitude vector around an inner adapter; needs the base weight."""

    inner: object  # LoraFactors | LohaFactors | LokrFactors | FullDelta
    magnitude: torch.Tensor
    axis: str  # "out" (PEFT, LyCORIS wd_on_out) or "in"
    kind: ClassVar[str] = "dora"
    needs_base: ClassVar[bool] = True

    @property
    def rank(self) -> int:
        return self.inner.rank

    def check(self, target: tuple[int, ...]) -> None:
        self.inner.check(target)

    def delta(self, target: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise AdapterShapeError("DoRA needs the base weight it is applied to (W_init); bake the adapter first")
        if tuple(base.shape) != tuple(target):
            raise AdapterShapeError(f"base weight {tuple(base.shape)} is not the module's weight {tuple(target)}")
        W = _f32(base)
        return dora_weight(W, self.inner.delta(target), self.magnitude, self.axis) - W


@dataclass(frozen=True)
class BakedDelta:
    """A delta already computed against the base weight (a baked DoRA module)."""

    value: torch.Tensor
    kind: str
    rank: int
    needs_base: ClassVar[bool] = False

    def check(self, target: tuple[int, ...]) -> None:
        if tuple(self.value.shape) != tuple(target):
            raise AdapterShapeError(f"baked delta {tuple(self.value.shape)} is not weight {tuple(target)}")

    def delta(self, target: tuple[int, ...]) -> torch.Tensor:
        return self.value.reshape(target)


_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LYCORIS_PARTS = frozenset(_LOHA + _LOKR + ("hada_t1", "hada_t2", "diff", "diff_b"))


def _rank_alpha(alpha: float | None, rank: int) -> float:
    """LyCORIS / kohya: a missing or zero alpha means ``alpha = r`` (scale 1)."""
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


def build_lycoris(parts: Mapping[str, torch.Tensor], alpha: float | None) -> object:
    """A LoHa, LoKr or full-diff module from its LyCORIS tensors (without any DoRA scale)."""
    names = set(parts)
    if names & set(_LOHA) or {"hada_t1", "hada_t2"} & names:
        missing = [n for n in _LOHA if n not in names]
        if missing:
            raise AdapterShapeError(f"LoHa module lacks {missing}")
        if ("hada_t1" in names) != ("hada_t2" in names):
            raise AdapterShapeError("LoHa Tucker module needs both hada_t1 and hada_t2")
        rank = int(parts["hada_w1_b"].shape[0])
        return LohaFactors(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"],
                           _rank_alpha(alpha, rank), rank, parts.get("hada_t1"), parts.get("hada_t2"))
    if names & set(_LOKR):
        w1_ab = "lokr_w1_a" in names and "lokr_w1_b" in names
        w2_ab = "lokr_w2_a" in names and "lokr_w2_b" in names
        if not ("lokr_w1" in names or w1_ab) or not ("lokr_w2" in names or w2_ab):
            raise AdapterShapeError(f"LoKr module needs lokr_w1 or lokr_w1_a/b and lokr_w2 or lokr_w2_a/b, "
                                    f"got {sorted(names)}")
        if "lokr_t2" in names and not w2_ab:
            raise AdapterShapeError("LoKr lokr_t2 needs lokr_w2_a and lokr_w2_b")
        w1 = parts.get("lokr_w1")
        w2 = parts.get("lokr_w2")
        rank = int(parts["lokr_w1_b"].shape[0]) if w1 is None else int(parts["lokr_w2_b"].shape[0]) if w2 is None else 1
        return LokrFactors(w1, None if w1 is not None else parts["lokr_w1_a"],
                           None if w1 is not None else parts["lokr_w1_b"], w2,
                           None if w2 is not None else parts["lokr_w2_a"],
                           None if w2 is not None else parts["lokr_w2_b"],
                           parts.get("lokr_t2"), _rank_alpha(alpha, rank), rank)
    if "diff" in names:
        bias = parts.get("diff_b")
        if bias is not None and bool((bias != 0).any()):  # a torch tensor or a numpy array
            raise AdapterShapeError("non-zero bias delta diff_b: baked variants change weights only")
        return FullDelta(parts["diff"])
    raise AdapterShapeError(f"no adapter factors among {sorted(names)}")


def wrap_dora(inner: object, scale: torch.Tensor, target: tuple[int, ...], *, peft: bool) -> DoraFactors:
    """Wrap an adapter in DoRA, reading the norm axis from the magnitude's shape.

    PEFT ``lora_magnitude_vector``: (out,) for Linear, (1, out, 1, 1) for conv, always per output
    row. kohya / LyCORIS ``dora_scale``: (out, 1, ...) per output row, (1, in, ...) per input column.
    """
    shape = tuple(scale.shape)
    numel = math.prod(shape)  # a torch tensor or a numpy array
    out, cin = target[0], target[1]
    if peft:
        if numel != out:
            raise AdapterShapeError(f"lora_magnitude_vector {shape} does not have {out} entries")
        return DoraFactors(inner, scale, "out")
    if shape and shape[0] == out and numel == out:
        return DoraFactors(inner, scale, "out")
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == cin and numel == cin:
        return DoraFactors(inner, scale, "in")
    raise AdapterShapeError(f"dora_scale {shape} fits neither ({out}, 1, ...) nor (1, {cin}, ...)")
