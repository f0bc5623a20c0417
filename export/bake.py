"""Baked UNet weight variants (CRAFT-LoRA Eq. 7-8): W_init plus routed, gated LoRA deltas.

The exporter bakes every variant of the plan into an engine; the PyTorch reference bakes the
variants each step needs and swaps them in with ``torch.func.functional_call``. Both use
:class:`VariantBaker`, so "which weights a variant has" is computed in one place (fp32, cast
back, non-finite results refused naming the adapter and module).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from craft_ops.aggregate import Variant, aggregate, routed_deltas
from craft_ops.lora import adapter_deltas
from craft_ops.routing import Routing

from .recipe_models import LoadedLora

__all__ = ["variant_weights", "VariantBaker"]


def variant_weights(
    W_init: Mapping[str, torch.Tensor],
    variant: Variant,
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Module -> weight for the modules a variant changes (Eq. 8); empty for W_init."""
    if variant.is_base:
        return {}
    c = deltas[variant.content] if variant.content else {}
    s = deltas[variant.style] if variant.style else {}
    merged = aggregate(W_init, c, s, variant.gamma_c, variant.gamma_s, name=str(variant))
    return {m: merged[m] for m in (*c, *s)}


class VariantBaker:
    """The weights of any variant of one UNet (W_init) and a set of LoRAs, as parameter overrides.

    ``prefix``: the UNet's name inside the module the overrides are for (``"unet."`` for
    :class:`~craft_export.networks.UNetNet`).
    """

    def __init__(self, W_init: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                 routing: Routing, loras: Iterable[LoadedLora], *, prefix: str = "unet."):
        self.W_init = W_init
        self.shapes = shapes
        self.routing = routing
        self.loras = {lora.name: lora for lora in loras}
        self.prefix = prefix
        self._deltas: dict[str, dict[str, torch.Tensor]] = {}
        self._params: dict[Variant, dict[str, torch.Tensor]] = {}

    def routed(self, name: str) -> dict[str, torch.Tensor]:
        """fp32 deltas of one LoRA inside its own layer set (Eq. 7), cached."""
        if name not in self._deltas:
            lora = self.loras[name]
            self._deltas[name] = routed_deltas(lora.adapter, lora.kind, self.routing, self.shapes)
        return self._deltas[name]

    def routed_modules(self, name: str) -> list[str]:
        """The module names :meth:`routed` keys, without computing the deltas."""
        lora = self.loras[name]
        return sorted(self.routing.select(lora.kind, lora.adapter.modules))

    def params_for(self, variant: Variant, *, cache: bool = True) -> dict[str, torch.Tensor]:
        """``functional_call`` overrides (``unet.<module>.weight``) for a variant; cached unless
        ``cache=False`` (the exporter bakes each variant once: then no fp32 delta is kept either,
        each is computed for its module and dropped once added, so only the new weights stay)."""
        if variant in self._params:
            return self._params[variant]
        names = (variant.content, variant.style)
        if cache:
            deltas = {n: self.routed(n) for n in names if n}
        else:
            deltas = {n: self._deltas.get(n) or _LazyDeltas(self, n) for n in names if n}
        weights = variant_weights(self.W_init, variant, deltas)
        params = {f"{self.prefix}{m}.weight": w for m, w in weights.items()}
        if cache:
            self._params[variant] = params
        return params


class _LazyDeltas(Mapping):
    """One LoRA's routed deltas (:meth:`VariantBaker.routed`), each computed when it is read and not
    kept: :func:`~craft_ops.aggregate.aggregate` adds them one module at a time, so a variant costs
    its new weights plus one module's delta instead of every routed delta at once."""

    def __init__(self, baker: VariantBaker, name: str):
        lora = baker.loras[name]
        self._adapter, self._shapes = lora.adapter, baker.shapes
        self._modules = list(baker.routing.select(lora.kind, lora.adapter.modules))
        self._known = set(self._modules)

    def __getitem__(self, module: str) -> torch.Tensor:
        if module not in self._known:
            raise KeyError(module)
        return adapter_deltas(self._adapter, self._shapes, [module])[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)
