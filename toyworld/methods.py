"""The methods the quality benchmark compares, all sampled through the project's reference pipeline.

Every method is the :class:`craft_reference.pipeline.ReferencePipeline` (text encoding, the
time-gated ACFG / CFG loop of :mod:`craft_ops.sampling`, VAE decoding) with one of four
LoRA sets (see :mod:`.concepts`), on W0 or W_init, with or without layer routing, time gates
and the W_init-only unconditional branch:

=================  ==========  =======  ======  ==========  =====
method             LoRAs       UNet     routed  time gates  guid.
=================  ==========  =======  ======  ==========  =====
content alone      all / W0    W0       no      no          CFG
style alone        all / W0    W0       no      no          CFG
direct merge       all / W0    W0       no      no          CFG
CRAFT-LoRA         routed      W_init   yes     yes         ACFG
no Rank-FT         routed/W0   W0       yes     yes         ACFG
no routing         all/W_init  W_init   no      yes         ACFG
no time gates      routed      W_init   yes     no          ACFG
CFG, not ACFG      routed      W_init   yes     yes         CFG
CRAFT content / style alone: the CRAFT LoRAs one at a time (upper bounds for CRAFT).
=================  ==========  =======  ======  ==========  =====

"Not routed" means every delta in the LoRA file is added (ordinary LoRA merging,
``W0 + dW_c + dW_s`` where both touch a layer) instead of Eq. 7's disjoint sets; "no time
gates" means both windows are the whole trajectory; CFG runs the step's weights on both
branches (DESIGN-NOTES 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from craft_ops.aggregate import Variant
from craft_ops.gates import DEFAULT_CONTENT_WINDOW, DEFAULT_STYLE_WINDOW
from craft_ops.lora import adapter_deltas
from craft_ops.request import Defaults, GenerateRequest, Limits
from craft_ops.routing import resolve_routing
from craft_export.recipe_models import LoadedLora
from craft_reference.pipeline import ReferencePipeline

from .concepts import CONTENT_PROMPT, STYLE_PROMPT, TOY_ROUTING, pair_prompt

__all__ = ["Method", "METHODS", "method", "UnroutedPipeline", "build_pipeline", "sample_images", "SampleSettings"]

FULL = (0.0, 1.0)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    loras: str  # LoRA set: "all_w0" | "routed_winit" | "routed_w0" | "all_winit"
    backbone: bool  # UNet = W_init (True) or W0
    routed: bool  # Eq. 7 layer routing at sampling time
    mode: str  # "acfg" | "cfg"
    time_gates: bool
    uses: str = "pair"  # "pair" | "content" | "style": which LoRAs and which prompt

    def prompt(self) -> str:
        return {"pair": pair_prompt(), "content": CONTENT_PROMPT, "style": STYLE_PROMPT}[self.uses]


METHODS: tuple[Method, ...] = (
    Method("content_alone", "content LoRA alone", "all_w0", False, False, "cfg", False, "content"),
    Method("style_alone", "style LoRA alone", "all_w0", False, False, "cfg", False, "style"),
    Method("direct_merge", "direct merge", "all_w0", False, False, "cfg", False),
    Method("craft", "CRAFT-LoRA", "routed_winit", True, True, "acfg", True),
    Method("no_rankft", "CRAFT without Rank-FT", "routed_w0", False, True, "acfg", True),
    Method("no_routing", "CRAFT without routing", "all_winit", True, False, "acfg", True),
    Method("no_time_gates", "CRAFT without time gates", "routed_winit", True, True, "acfg", False),
    Method("cfg", "CRAFT with CFG instead of ACFG", "routed_winit", True, True, "cfg", True),
    Method("craft_content_alone", "CRAFT content LoRA alone", "routed_winit", True, True, "acfg", True, "content"),
    Method("craft_style_alone", "CRAFT style LoRA alone", "routed_winit", True, True, "acfg", True, "style"),
)


def method(name: str) -> Method:
    for m in METHODS:
        if m.name == name:
            return m
    raise ValueError(f"method: unknown method {name!r}; choose one of {[m.name for m in METHODS]}")


class UnroutedPipeline(ReferencePipeline):
    """Every delta of each LoRA file applies, summed where two touch a layer (no Eq. 7 routing)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._full: dict[str, dict[str, torch.Tensor]] = {}
        self._weights: dict[Variant, dict[str, torch.Tensor]] = {}

    def routed(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._full:
            self._full[name] = adapter_deltas(self.loras[name].adapter, self.shapes)
        return self._full[name]

    def params_for(self, variant: Variant, *, cache: bool = True) -> dict[str, torch.Tensor]:
        if variant in self._weights:
            return self._weights[variant]
        sums: dict[str, torch.Tensor] = {}
        for name, gamma in ((variant.content, variant.gamma_c), (variant.style, variant.gamma_s)):
            if name is None:
                continue
            for module, delta in self.routed(name).items():
                W = sums.get(module, self.W_init[module].float())
                sums[module] = W + gamma * delta.float().reshape(W.shape)
        params = {f"unet.{m}.weight": w.to(self.W_init[m].dtype) for m, w in sums.items()}
        if cache:
            self._weights[variant] = params
        return params


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 20
    omega: float = 4.0
    scheduler: str = "euler"
    content_window: tuple[float, float] = DEFAULT_CONTENT_WINDOW.bounds  # time gates of the gated methods
    style_window: tuple[float, float] = DEFAULT_STYLE_WINDOW.bounds

    @classmethod
    def from_dict(cls, d: Mapping) -> "SampleSettings":
        """From :func:`craft_toyworld.catalog.sampling_defaults` (keys steps, omega, scheduler, windows)."""
        keys = ("steps", "omega", "scheduler", "content_window", "style_window")
        return cls(**{k: tuple(d[k]) if k.endswith("window") else d[k] for k in keys if k in d})


def build_pipeline(base: Path, backbone: Path | None, loras: Mapping[str, tuple[str, Path]], *, routed: bool,
                   settings: SampleSettings = SampleSettings(), max_batch: int = 64):
    """A reference pipeline on W0 (``backbone=None``) or W_init with ``{name: (kind, file)}`` LoRAs."""
    from craft_export.loading import load_lora, load_pipeline_parts, unet_module_shapes, unet_weights

    parts = load_pipeline_parts(base, backbone=backbone)
    shapes, weights = unet_module_shapes(parts.unet), unet_weights(parts.unet)
    loaded = [LoadedLora(n, kind, load_lora(p, shapes, name=n, weights=weights)[0]) for n, (kind, p) in loras.items()]
    defaults = Defaults(steps=settings.steps, guidance=settings.omega, scheduler=settings.scheduler, height=64, width=64,
                        content_window=settings.content_window, style_window=settings.style_window)
    cls = ReferencePipeline if routed else UnroutedPipeline
    return cls(parts, resolve_routing(TOY_ROUTING), loaded, defaults, Limits(max_prompts=max_batch))


def sample_images(pipe, m: Method, content: str | None, style: str | None, seeds: Sequence[int],
                  batch: int = 32) -> np.ndarray:
    """(len(seeds), 64, 64, 3) uint8 for consecutive ``seeds``, in batches sharing one sampling loop."""
    seeds = list(seeds)
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError("seeds: must be consecutive integers (a request's prompt k uses seed + k)")
    windows = {} if m.time_gates else {"content_window": FULL, "style_window": FULL}
    out = []
    for k in range(0, len(seeds), batch):
        n = min(batch, len(seeds) - k)
        request = GenerateRequest(prompts=(m.prompt(),) * n, content=content if m.uses != "style" else None,
                                  style=style if m.uses != "content" else None, seed=seeds[k], mode=m.mode, **windows)
        out.append(pipe.generate(request))
    return np.concatenate(out)
