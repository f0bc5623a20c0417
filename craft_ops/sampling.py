"""The CRAFT-LoRA sampling loop with time-gated ACFG (Eq. 9-11), k-diffusion style.

The loop never touches a network: it calls ``denoise(calls) -> [eps, ...]`` with one
:class:`UNetCall` per branch, so the same loop runs against the PyTorch reference, Triton
BLS calls or a fake in a test. Each call names the weight :class:`Variant` it needs;
under ACFG the unconditional branch is always W_init (Eq. 10).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .aggregate import BASE, Variant
from .gates import DEFAULT_CONTENT_WINDOW, DEFAULT_STYLE_WINDOW, Window, step_gates
from .guidance import acfg, cfg, check_omega

__all__ = [
    "UNetCall",
    "Denoiser",
    "SamplingConfig",
    "SCHEDULERS",
    "MODES",
    "make_scheduler",
    "initial_latents",
    "step_variants",
    "sample",
]

MODES = ("acfg", "cfg")


@dataclass(frozen=True)
class UNetCall:
    """One UNet evaluation asked of the denoiser."""

    x: torch.Tensor  # (B, 4, h, w) scheduler-scaled model input
    t: torch.Tensor  # () timestep
    cond: Any  # opaque conditioning (text embeddings etc.) for this branch
    variant: Variant  # weights to use: W_init + gated deltas


class Denoiser(Protocol):
    def __call__(self, calls: Sequence[UNetCall]) -> Sequence[torch.Tensor]: ...


@dataclass(frozen=True)
class SamplingConfig:
    """Everything the loop needs besides the networks; validated once."""

    steps: int
    omega: float
    mode: str = "acfg"
    content: str | None = None
    style: str | None = None
    gamma_c: float = 0.0
    gamma_s: float = 0.0
    content_window: Window = field(default=DEFAULT_CONTENT_WINDOW)
    style_window: Window = field(default=DEFAULT_STYLE_WINDOW)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be an integer in [1, 1000], got {self.steps!r}")
        check_omega(self.omega)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "content_window", Window.of(self.content_window, "content_window"))
        object.__setattr__(self, "style_window", Window.of(self.style_window, "style_window"))
        Variant(self.content, self.gamma_c, self.style, self.gamma_s)  # validates the gates


def step_variants(config: SamplingConfig) -> list[Variant]:
    """The conditional-branch weights of every step (prompt gate x time gate, Eq. 9)."""
    out = []
    for i in range(1, config.steps + 1):
        g_c, g_s = step_gates(i, config.steps, config.gamma_c, config.gamma_s,
                              config.content_window, config.style_window)
        out.append(Variant(config.content, g_c, config.style, g_s))
    return out


# name -> (diffusers class name, config overrides)
SCHEDULERS: Mapping[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
}


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A fresh diffusers scheduler of the given name, from a pipeline's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    cls_name, overrides = SCHEDULERS[name]
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config({**config, **overrides})


def initial_latents(seed: int, shape: tuple[int, ...], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Generator]:
    """Seeded fp32 noise from a CPU generator (DESIGN-NOTES 8); the generator is returned for ancestral steps."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device), generator


def sample(
    denoise: Denoiser,
    scheduler,
    noise: torch.Tensor,
    cond: Any,
    uncond: Any,
    config: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the time-gated ACFG (or CFG) loop and return the final latents (Eq. 9-11).

    ACFG: conditional branch on the step's variant, unconditional on W_init, combined with
    ``(1 + omega) eps_cond - omega eps_uncond`` at every step. CFG: both branches on the
    step's variant. ``callback(step, steps, latents)`` runs after every step; raising
    from it stops the loop (cancellation).
    """
    scheduler.set_timesteps(config.steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma  # (B, 4, h, w)
    variants = step_variants(config)
    if len(scheduler.timesteps) != config.steps:
        raise ValueError(f"scheduler gave {len(scheduler.timesteps)} timesteps for steps={config.steps}")
    combine = acfg if config.mode == "acfg" else cfg
    for i, (t, variant) in enumerate(zip(scheduler.timesteps, variants), start=1):
        x_in = scheduler.scale_model_input(x, t)
        uncond_variant = BASE if config.mode == "acfg" else variant
        eps_cond, eps_uncond = denoise([UNetCall(x_in, t, cond, variant), UNetCall(x_in, t, uncond, uncond_variant)])
        eps = combine(eps_cond, eps_uncond, config.omega)
        x = scheduler.step(eps, t, x, generator=generator, return_dict=False)[0]
        if callback is not None:
            callback(i, config.steps, x)
    return x
