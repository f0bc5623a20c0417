"""CRAFT-LoRA math as pure functions: LoRA deltas, routing, gates, aggregation, ACFG, Rank-FT, sampling,
request planning and the request loop every pipeline runs (:func:`run_plan`).

No file I/O and no ONNX / TensorRT / Triton imports: everything here takes and returns
tensors (and callables), so the same code serves the PyTorch reference, the exporter and the server.
"""

from .aggregate import BASE, Variant, aggregate, routed_deltas
from .conditioning import build_conditioning, run_plan, to_uint8, tokenize, unet_inputs
from .gates import (
    DEFAULT_CONTENT_WINDOW,
    DEFAULT_STYLE_WINDOW,
    GateError,
    PromptGates,
    Window,
    check_gamma,
    gate_schedule,
    parse_prompt,
    step_gates,
)
from .guidance import GUIDANCE_MAX, acfg, cfg, check_omega
from .lora import LoraAdapter, LoraError, LoraFactors, adapter_deltas, detect_format, lora_delta, parse_lora
from .rankft import merged_basis, orthonormal_basis, projection_residual, rank_schedule
from .request import Defaults, GenerateRequest, Limits, LoraInfo, Plan, RequestError, plan_request
from .routing import PRESETS, Routing, RoutingError, resolve_routing
from .sampling import (
    MODES,
    SCHEDULERS,
    SamplingConfig,
    UNetCall,
    initial_latents,
    make_scheduler,
    sample,
    step_variants,
)

__all__ = [name for name in dir() if not name.startswith("_")]
