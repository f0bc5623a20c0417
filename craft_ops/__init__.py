"""CRAFT-LoRA math as pure functions: LoRA deltas, routing, gates, aggregation, ACFG, Rank-FT, sampling,
request planning and the request loop every pipeline runs (:func:`run_plan`).

No file I/O and no ONNX / TensorRT / Triton imports: everything here takes and returns
tensors (and callables), so the same code serves the PyTorch reference, the exporter and the server.

Imports are lazy (PEP 562): ``from craft_ops import sample`` imports :mod:`.sampling` when asked, so
that ``craft_ops.lora`` / ``craft_ops.runtime_lora`` / ``craft_ops.request`` can be used without
loading torch (see :mod:`.lazy`).
"""

from __future__ import annotations

import importlib
from typing import Any

# submodule -> the names this package re-exports from it (the function ``aggregate`` is not among them:
# ``craft_ops.aggregate`` is its module, whichever was imported first)
_EXPORTS = {
    "aggregate": ("BASE", "Variant", "routed_deltas"),
    "conditioning": ("build_conditioning", "run_plan", "to_uint8", "tokenize", "unet_inputs"),
    "gates": ("DEFAULT_CONTENT_WINDOW", "DEFAULT_STYLE_WINDOW", "GateError", "PromptGates", "Window", "check_gamma",
              "gate_schedule", "parse_prompt", "step_gates"),
    "guidance": ("GUIDANCE_MAX", "acfg", "cfg", "check_omega"),
    "lora": ("LoraAdapter", "LoraError", "LoraFactors", "adapter_deltas", "detect_format", "lora_delta", "parse_lora"),
    "rankft": ("merged_basis", "orthonormal_basis", "projection_residual", "rank_schedule"),
    "request": ("Defaults", "GenerateRequest", "Limits", "LoraInfo", "Plan", "RequestError", "plan_request"),
    "routing": ("PRESETS", "Routing", "RoutingError", "resolve_routing"),
    "sampling": ("MODES", "SCHEDULERS", "SamplingConfig", "UNetCall", "initial_latents", "make_scheduler", "sample",
                 "step_variants"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'craft_ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
