"""Selective aggregation of routed, gated LoRA deltas onto W_init (CRAFT-LoRA Eq. 8)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .lazy import torch

from .lora import LoraAdapter, LoraError, adapter_deltas
from .routing import Routing

__all__ = ["Variant", "routed_deltas", "aggregate", "BASE"]


@dataclass(frozen=True)
class Variant:
    """The adapters active on the conditional branch at one step, with their gates.

    A gate of 0 means the adapter is off; ``Variant()`` (nothing active) is W_init.
    """

    content: str | None = None
    gamma_c: float = 0.0
    style: str | None = None
    gamma_s: float = 0.0

    def __post_init__(self) -> None:
        for field, g in (("gamma_c", self.gamma_c), ("gamma_s", self.gamma_s)):
            if not math.isfinite(g) or not 0.0 <= g <= 1.0:
                raise ValueError(f"{field} must be in [0, 1], got {g!r}")
        # normalise: an adapter with gate 0 is the same weights as no adapter
        if self.content is None or self.gamma_c == 0.0:
            object.__setattr__(self, "content", None)
            object.__setattr__(self, "gamma_c", 0.0)
        if self.style is None or self.gamma_s == 0.0:
            object.__setattr__(self, "style", None)
            object.__setattr__(self, "gamma_s", 0.0)

    @property
    def is_base(self) -> bool:
        return self.content is None and self.style is None

    def __str__(self) -> str:
        parts = []
        if self.content:
            parts.append(f"c={self.content}@{self.gamma_c:g}")
        if self.style:
            parts.append(f"s={self.style}@{self.gamma_s:g}")
        return "+".join(parts) or "W_init"


BASE = Variant()


def routed_deltas(
    adapter: LoraAdapter,
    kind: str,
    routing: Routing,
    module_shapes: Mapping[str, tuple[int, ...]],
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """fp32 deltas of an adapter restricted to its layer set, ``E_i(dW_i)`` for i in I_kind (Eq. 7-8).

    ``weights`` (W_init by module) is needed only for an adapter with unbaked DoRA modules.
    """
    inside = routing.select(kind, adapter.modules)
    return adapter_deltas(adapter, module_shapes, inside, weights=weights)


def aggregate(
    W_init: Mapping[str, torch.Tensor],
    content_deltas: Mapping[str, torch.Tensor] | None = None,
    style_deltas: Mapping[str, torch.Tensor] | None = None,
    gamma_c: float = 1.0,
    gamma_s: float = 1.0,
    *,
    name: str = "variant",
) -> dict[str, torch.Tensor]:
    """Eq. 8: ``W_agg = W_init + sum_{I_c} gamma_c dW^c + sum_{I_s} gamma_s dW^s``.

    ``W_init`` maps module name -> weight. Returns a new mapping (inputs are never
    mutated); modules without a delta keep their original tensor object. Sums are done in
    fp32 and cast back; non-finite results raise, naming the module.
    """
    content_deltas = content_deltas or {}
    style_deltas = style_deltas or {}
    overlap = set(content_deltas) & set(style_deltas)
    if overlap:
        raise LoraError(f"{name}: content and style deltas overlap on {sorted(overlap)[:3]} (routing sets must be disjoint)")
    out = dict(W_init)
    for deltas, gamma in ((content_deltas, gamma_c), (style_deltas, gamma_s)):
        if gamma == 0.0:
            continue
        for module, delta in deltas.items():
            if module not in W_init:
                raise LoraError(f"{name}: delta for unknown module {module!r}")
            W = W_init[module]
            new = W.float() + gamma * delta.float().reshape(W.shape)
            if not torch.isfinite(new).all():
                raise LoraError(f"{name}: non-finite weight after aggregation in module {module!r}")
            out[module] = new.to(W.dtype)
    return out
