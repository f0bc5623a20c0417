"""A generation request -> a validated sampling plan (routing gates of Eq. 6, time gates of Eq. 9).

Shared by the PyTorch reference and the Triton pipeline model so both accept, refuse and
interpret a request identically. Every refusal is a :class:`RequestError` naming the
field and the value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .lazy import torch

from .gates import DEFAULT_CONTENT_WINDOW, DEFAULT_STYLE_WINDOW, GateError, Window, parse_prompt
from .guidance import GUIDANCE_MAX
from .sampling import MODES, SCHEDULERS, SamplingConfig, initial_latents

__all__ = [
    "RequestError",
    "LoraInfo",
    "Defaults",
    "Limits",
    "GenerateRequest",
    "PromptGroup",
    "Plan",
    "plan_request",
    "group_noise",
]



class RequestError(ValueError):
    """A request field with a value the server cannot serve."""

    def __init__(self, field: str, value: object, reason: str):
        self.field = field
        self.value = value
        super().__init__(f"{field}: {reason} (got {value!r})")


@dataclass(frozen=True)
class LoraInfo:
    """What a request may ask of one LoRA: its kind and, for baked engines, the gate values."""

    name: str
    kind: str  # "content" | "style"
    gammas: tuple[float, ...] | None = None  # None: any value in [0, 1] (runtime baking)


@dataclass(frozen=True)
class Defaults:
    """Request defaults (recipe ``[defaults]`` / manifest)."""

    steps: int = 30
    guidance: float = 6.5
    scheduler: str = "euler"
    height: int = 512
    width: int = 512
    mode: str = "acfg"
    content_window: tuple[float, float] = DEFAULT_CONTENT_WINDOW.bounds
    style_window: tuple[float, float] = DEFAULT_STYLE_WINDOW.bounds

    def as_dict(self) -> dict:
        return {"steps": self.steps, "guidance": self.guidance, "scheduler": self.scheduler,
                "height": self.height, "width": self.width, "mode": self.mode,
                "content_window": list(self.content_window), "style_window": list(self.style_window)}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; checked by :func:`plan_request` before any work is done.

    ``max_pixels``: height x width x prompts of one request (None: whatever the size and prompt
    limits allow). ``max_prompt_chars``: per prompt and for the negative prompt (CLIP reads 77
    tokens; the cap bounds the work of tokenising).
    """

    min_hw: tuple[int, int] = (64, 64)
    max_hw: tuple[int, int] = (2048, 2048)
    multiple: int = 8
    max_steps: int = 1000
    max_prompts: int = 8
    max_pixels: int | None = None
    max_prompt_chars: int = 4096


@dataclass(frozen=True)
class GenerateRequest:
    """One request as the client sends it; ``None`` means "use the default"."""

    prompts: tuple[str, ...]
    negative_prompt: str = ""
    content: str | None = None
    style: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    gamma_c: float | None = None
    gamma_s: float | None = None
    mode: str | None = None
    scheduler: str | None = None
    content_window: tuple[float, float] | None = None
    style_window: tuple[float, float] | None = None


@dataclass(frozen=True)
class PromptGroup:
    """Prompts that share their gates and so one sampling loop (one latent batch)."""

    indices: tuple[int, ...]
    texts: tuple[str, ...]  # routing tokens stripped (Eq. 6)
    seeds: tuple[int, ...]
    config: SamplingConfig


@dataclass(frozen=True)
class Plan:
    groups: tuple[PromptGroup, ...]
    negative_prompt: str
    height: int
    width: int
    scheduler: str
    num_prompts: int
    notes: tuple[str, ...] = field(default=())


def _lookup(catalog: Mapping[str, LoraInfo], field_name: str, name: str | None, kind: str) -> LoraInfo | None:
    if name is None or name == "":
        return None
    info = catalog.get(name)
    if info is None:
        raise RequestError(field_name, name, f"unknown LoRA; available {kind} LoRAs: "
                           f"{sorted(n for n, i in catalog.items() if i.kind == kind)}")
    if info.kind != kind:
        raise RequestError(field_name, name, f"LoRA is a {info.kind} LoRA, not a {kind} one")
    return info


def _check_int(field_name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise RequestError(field_name, value, "must be an integer")
    v = int(value)
    if not lo <= v <= hi:
        raise RequestError(field_name, value, f"must be in [{lo}, {hi}]")
    return v


def _check_size(field_name: str, value: object, lo: int, hi: int, multiple: int) -> int:
    v = _check_int(field_name, value, lo, hi)
    if v % multiple:
        raise RequestError(field_name, value, f"must be a multiple of {multiple}")
    return v


def _check_gate(field_name: str, value: float, info: LoraInfo | None) -> float:
    if value > 0 and info is None:
        raise RequestError(field_name, value, "is non-zero but no LoRA of that kind was given")
    if info is not None and info.gammas is not None and value != 0.0 and not any(
        math.isclose(value, g, abs_tol=1e-6) for g in info.gammas
    ):
        raise RequestError(field_name, value, f"LoRA {info.name!r} is baked for gammas {list(info.gammas)} only")
    return value


def _gates(prompt: str, idx: int, req: GenerateRequest, c_info: LoraInfo | None, s_info: LoraInfo | None,
           notes: list[str], max_chars: int):
    field_name = "prompt" if idx == 0 else f"prompt[{idx}]"
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(field_name, prompt[:40] if isinstance(prompt, str) else prompt, "must be a non-empty string")
    if len(prompt) > max_chars:
        raise RequestError(field_name, prompt[:40] + "...", f"is longer than {max_chars} characters")
    try:
        gates = parse_prompt(prompt, gamma_c=req.gamma_c, gamma_s=req.gamma_s)
    except GateError as exc:
        bad = "gamma_c" if "gamma_c" in str(exc) else "gamma_s"
        raise RequestError(bad, getattr(req, bad), str(exc)) from exc
    if gates.has_content_token and c_info is None:
        raise RequestError(field_name, prompt, "contains <c> but no content LoRA was given")
    if gates.has_style_token and s_info is None:
        raise RequestError(field_name, prompt, "contains <s> but no style LoRA was given")
    for kind, info, token, override in (("content", c_info, gates.has_content_token, req.gamma_c),
                                        ("style", s_info, gates.has_style_token, req.gamma_s)):
        if info is not None and not token and override is None:
            notes.append(f"{field_name}: {kind} LoRA {info.name!r} given without <{kind[0]}> in the prompt: gamma_{kind[0]} = 0")
    return gates, _check_gate("gamma_c", gates.gamma_c, c_info), _check_gate("gamma_s", gates.gamma_s, s_info)


def _window(field_name: str, value, default) -> Window:
    try:
        return Window.of(default if value is None else value, field_name)
    except GateError as exc:
        raise RequestError(field_name, value, str(exc)) from exc


def plan_request(
    req: GenerateRequest,
    catalog: Mapping[str, LoraInfo],
    defaults: Defaults = Defaults(),
    limits: Limits = Limits(),
) -> Plan:
    """Validate a request and group its prompts into sampling loops (Eq. 6, 9, 11 settings)."""
    # 1. counts, LoRAs and scalar settings
    if not req.prompts:
        raise RequestError("prompt", list(req.prompts), "at least one prompt is required")
    if len(req.prompts) > limits.max_prompts:
        raise RequestError("prompt", f"{len(req.prompts)} prompts", f"at most {limits.max_prompts} prompts per request")
    if not isinstance(req.negative_prompt, str) or len(req.negative_prompt) > limits.max_prompt_chars:
        shown = req.negative_prompt[:40] + "..." if isinstance(req.negative_prompt, str) else req.negative_prompt
        raise RequestError("negative_prompt", shown, f"must be a string of at most {limits.max_prompt_chars} characters")
    c_info = _lookup(catalog, "content", req.content, "content")
    s_info = _lookup(catalog, "style", req.style, "style")
    seed = _check_int("seed", req.seed, 0, 2**63 - 1 - limits.max_prompts)
    steps = _check_int("steps", defaults.steps if req.steps is None else req.steps, 1, limits.max_steps)
    omega = defaults.guidance if req.guidance is None else req.guidance
    if not isinstance(omega, (int, float)) or not math.isfinite(omega) or not 0 <= omega <= GUIDANCE_MAX:
        raise RequestError("guidance", omega, f"must be a finite number in [0, {GUIDANCE_MAX:g}]")
    height = _check_size("height", defaults.height if req.height is None else req.height,
                         limits.min_hw[0], limits.max_hw[0], limits.multiple)
    width = _check_size("width", defaults.width if req.width is None else req.width,
                        limits.min_hw[1], limits.max_hw[1], limits.multiple)
    pixels = len(req.prompts) * height * width
    if limits.max_pixels is not None and pixels > limits.max_pixels:
        raise RequestError("prompt", f"{len(req.prompts)} x {height} x {width} = {pixels} pixels",
                           f"at most {limits.max_pixels} pixels per request (prompts x height x width)")
    mode = defaults.mode if req.mode in (None, "") else req.mode
    if mode not in MODES:
        raise RequestError("mode", mode, f"must be one of {list(MODES)}")
    scheduler = defaults.scheduler if req.scheduler in (None, "") else req.scheduler
    if scheduler not in SCHEDULERS:
        raise RequestError("scheduler", scheduler, f"must be one of {sorted(SCHEDULERS)}")
    content_window = _window("content_window", req.content_window, defaults.content_window)
    style_window = _window("style_window", req.style_window, defaults.style_window)

    # 2. per-prompt gates, grouped by value
    notes: list[str] = []
    by_gates: dict[tuple[float, float], list[tuple[int, str]]] = {}
    for idx, prompt in enumerate(req.prompts):
        gates, g_c, g_s = _gates(prompt, idx, req, c_info, s_info, notes, limits.max_prompt_chars)
        by_gates.setdefault((g_c, g_s), []).append((idx, gates.text))
    groups = []
    for (g_c, g_s), members in by_gates.items():
        config = SamplingConfig(
            steps=steps, omega=float(omega), mode=mode,
            content=c_info.name if c_info else None, style=s_info.name if s_info else None,
            gamma_c=g_c, gamma_s=g_s, content_window=content_window, style_window=style_window,
        )
        groups.append(PromptGroup(
            indices=tuple(i for i, _ in members), texts=tuple(t for _, t in members),
            seeds=tuple(seed + i for i, _ in members), config=config,
        ))
    return Plan(tuple(groups), req.negative_prompt, height, width, scheduler, len(req.prompts), tuple(notes))


def group_noise(group: PromptGroup, latent_shape: tuple[int, int, int], device="cpu") -> tuple[torch.Tensor, torch.Generator]:
    """Initial latents of a group: prompt k uses ``seed + k`` (DESIGN-NOTES 8); (B, C, h, w)."""
    draws = [initial_latents(s, (1, *latent_shape), device) for s in group.seeds]
    return torch.cat([d[0] for d in draws]), draws[0][1]
