"""The runtime-LoRA network's factor cache: padded factors by LoRA name, least recently used out first.

The cache *is* the network's factor banks (:func:`craft_export.runtime_network.runtime_spec`): per
routed module one A bank and one B bank of ``slots`` padded LoRAs. Slot 0 stays all zeros (no
LoRA); content LoRAs take slots of the I_c modules' banks, style LoRAs of the I_s modules' banks,
each kind with its own LRU order. A call asks for slot indices by LoRA key (name, factors key); a
LoRA not in the cache is read from its factor file into a free slot, or into the least recently
used slot that the call itself does not use. The banks are passed to the network as they are (no
per-call copy), so a request carries only names and gates.

Memory budget: ``slots x (content slot + style slot)`` bytes, fp32, where a slot holds one LoRA
padded to the network's max rank in every module of its layer set (the manifest's
``runtime_lora.slot_bytes``). :func:`slots_for_budget` turns a budget in MiB into a slot count:
as many as fit, at least 2 (slot 0 + one LoRA of each kind), at most :data:`MAX_SLOTS`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from craft_export.runtime_network import bank_names
from craft_ops.runtime_lora import RuntimeLayout, pad_factors

log = logging.getLogger(__name__)

__all__ = ["MAX_SLOTS", "CacheFull", "LoraKey", "LoraCache", "slots_for_budget"]

MAX_SLOTS = 256
LoraKey = tuple[str, str]  # (LoRA name, factors key)
Loader = Callable[[LoraKey], tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]]


class CacheFull(RuntimeError):
    """A call names more distinct LoRAs of one kind than the cache has slots (the caller splits it)."""


def slots_for_budget(layout: RuntimeLayout, budget_mb: float) -> int:
    """Bank slots (slot 0 included) whose banks fit ``budget_mb`` MiB; see the module docstring."""
    slot_bytes = 4 * (layout.slot_floats("content") + layout.slot_floats("style"))
    fit = int(budget_mb * 2**20) // max(1, slot_bytes)
    return max(2, min(MAX_SLOTS, fit))


class LoraCache:
    """Factor banks of a :class:`RuntimeLayout` with ``slots`` slots each (slot 0: zeros); see module docstring.

    ``loader(key) -> (kind, {module: (A, B)})`` reads one LoRA's unpadded factors (a factor file).
    """

    def __init__(self, layout: RuntimeLayout, slots: int, loader: Loader, device: torch.device | str = "cpu"):
        if slots < 2:
            raise ValueError(f"slots: the LoRA cache needs at least 2 (slot 0 is 'no LoRA'), got {slots}")
        self.layout, self.slots, self.loader = layout, int(slots), loader
        self.banks: dict[str, torch.Tensor] = {}  # on ``device``: a TensorRT engine reads them in place
        for i, m in enumerate(layout.modules):
            a_shape, b_shape = m.bank_shapes(layout.max_rank, self.slots)
            name_a, name_b = bank_names(i)
            self.banks[name_a] = torch.zeros(a_shape, device=device)
            self.banks[name_b] = torch.zeros(b_shape, device=device)
        self._modules = {kind: [(i, m) for i, m in enumerate(layout.modules) if m.kind == kind]
                         for kind in ("content", "style")}
        self._lru: dict[str, OrderedDict[LoraKey, int]] = {"content": OrderedDict(), "style": OrderedDict()}
        self.loads = 0  # LoRAs read from their factor files so far
        self.evictions = 0

    @property
    def capacity(self) -> int:
        """LoRAs of each kind held at once (slot 0 is reserved)."""
        return self.slots - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.banks.values())

    def resident(self, kind: str) -> list[LoraKey]:
        """Cached LoRAs of a kind, least recently used first."""
        return list(self._lru[kind])

    def drop(self, keep: Callable[[LoraKey], bool]) -> None:
        """Forget cached LoRAs for which ``keep`` is false (removed or changed by a re-export)."""
        for kind, lru in self._lru.items():
            for key in [k for k in lru if not keep(k)]:
                self._zero(kind, lru.pop(key))

    def indices(self, kind: str, keys: Sequence[LoraKey | None]) -> torch.Tensor:
        """(B,) int64 slot per item (0 for ``None``), loading missing LoRAs; :class:`CacheFull` if they don't fit."""
        lru = self._lru[kind]
        wanted = list(dict.fromkeys(k for k in keys if k is not None))
        if len(wanted) > self.capacity:
            raise CacheFull(f"{len(wanted)} different {kind} LoRAs in one call, the cache holds {self.capacity}")
        pinned = set(wanted)
        for key in wanted:
            if key in lru:
                lru.move_to_end(key)
            else:
                self._load(kind, key, self._free_slot(kind, pinned))
        return torch.tensor([0 if k is None else lru[k] for k in keys], dtype=torch.int64)

    def _free_slot(self, kind: str, pinned: set[LoraKey]) -> int:
        lru = self._lru[kind]
        used = set(lru.values())
        for slot in range(1, self.slots):
            if slot not in used:
                return slot
        victim = next(k for k in lru if k not in pinned)  # exists: len(pinned) <= capacity
        self.evictions += 1
        log.info("LoRA cache: evicting %s LoRA %s from slot %d", kind, victim[0], lru[victim])
        return lru.pop(victim)

    def _zero(self, kind: str, slot: int) -> None:
        for i, _ in self._modules[kind]:
            name_a, name_b = bank_names(i)
            self.banks[name_a][slot].zero_()
            self.banks[name_b][slot].zero_()

    def _load(self, kind: str, key: LoraKey, slot: int) -> None:
        file_kind, factors = self.loader(key)
        if file_kind and file_kind != kind:
            raise ValueError(f"LoRA {key[0]!r} is a {file_kind} LoRA, asked for as {kind}")
        unknown = set(factors) - {m.name for _, m in self._modules[kind]}
        if unknown:
            raise ValueError(f"LoRA {key[0]!r}: factors for modules outside the network's {kind} branches, "
                             f"e.g. {sorted(unknown)[0]!r}")
        R = self.layout.max_rank
        with torch.no_grad():
            for i, m in self._modules[kind]:
                name_a, name_b = bank_names(i)
                if m.name in factors:
                    A, B = pad_factors(m, *factors[m.name], R)
                    self.banks[name_a][slot].copy_(A)
                    self.banks[name_b][slot].copy_(B)
                else:
                    self.banks[name_a][slot].zero_()
                    self.banks[name_b][slot].zero_()
        self._lru[kind][key] = slot
        self.loads += 1
