"""``torch``, imported on first use: what lets the LoRA parsing and checks run without it.

Parsing a LoRA file, checking it against the module shapes and a runtime network's layout, and
reading a recipe only look at names and shapes; with numpy arrays in (``craft export`` registering a
LoRA into a runtime repository) they must not pay torch's import (seconds on a loaded machine).
The modules on that path write ``from .lazy import torch``: the name is a stand-in that imports
torch the first time one of its attributes is read (``torch.float32``, ``torch.zeros``...), so the
code reads as before and torch is loaded exactly when a function that computes with it runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["torch"]


class _LazyModule:
    """A module imported on the first attribute read, then returned from a cached reference."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"


torch: Any = _LazyModule("torch")
