"""The CRAFT-LoRA sampling loop with time-gated ACFG (Eq. 9-11), k-diffusion style.

The loop never touches a network: it calls ``denoise(calls) -> [eps, ...]`` with one
:class:`UNetCall` per branch, so the same loop runs against the PyTorch reference, Triton
BLS calls or a fake in a test. Each call names the weight :class:`Variant` it needs;
under ACFG the unconditional branch is always W_init (Eq. 10).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .lazy import torch

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
    "sde_noise_seed",
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


# name -> (diffusers class name, overrides that define the sampler, defaults the checkpoint's
# scheduler config may change). Every other config entry (timestep_spacing, steps_offset,
# prediction_type, rescale_betas_zero_snr, beta schedule...) comes from the checkpoint, as
# with diffusers' ``Cls.from_config(pipe.scheduler.config)``.
SCHEDULERS: Mapping[str, tuple[str, dict, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}, {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, {}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}, {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, {}),
    "unipc": ("UniPCMultistepScheduler", {}, {}),
    "ddim": ("DDIMScheduler", {}, {"clip_sample": False, "set_alpha_to_one": False}),
}


_IMPORT_LOCK = threading.Lock()


def _scheduler_class(cls_name: str):
    """``diffusers.<cls_name>``, one thread at a time: diffusers' lazy module is not thread-safe on a
    class's first access (concurrent first requests got ``AttributeError`` in the soak run)."""
    with _IMPORT_LOCK:
        import diffusers

        return getattr(diffusers, cls_name)


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A fresh diffusers scheduler of the given name, from a pipeline's scheduler config.

    The config is passed whole (``_class_name`` included), as diffusers' ``from_config`` takes a
    pipeline's ``scheduler.config``; a zero-terminal-SNR config is refused for a scheduler class
    that cannot honour it.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    cls_name, overrides, defaults = SCHEDULERS[name]
    cls = _scheduler_class(cls_name)
    if base_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(
            cls.__init__).parameters:
        raise ValueError(f"scheduler {name!r} ({cls_name}) cannot honour the checkpoint's rescale_betas_zero_snr = "
                         f"true; use one of euler, euler_a, dpmpp_2m, unipc, ddim")
    return cls.from_config({**defaults, **dict(base_config), **overrides})


def initial_latents(seed: int, shape: tuple[int, ...], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Generator]:
    """Seeded fp32 noise from a CPU generator (DESIGN-NOTES 8); the generator is returned for ancestral steps."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device), generator


def _step_kwargs(scheduler, generator: torch.Generator | None) -> dict:
    """``generator`` for the schedulers whose ``step`` draws noise (diffusers' ``prepare_extra_step_kwargs``)."""
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generator}
    return {}


def sde_noise_seed(generator: torch.Generator) -> int:
    """The Brownian-tree seed the loop draws for DPM++ SDE (advances ``generator`` the same way)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def _seed_sde_noise(scheduler, x: torch.Tensor, generator: torch.Generator | None) -> None:
    """Brownian-tree noise of the DPM++ SDE scheduler, seeded from the request's CPU generator.

    diffusers seeds the tree from ``noise_sampler_seed`` (random when unset) on the latents'
    device; here the seed is the generator's next draw (:func:`sde_noise_seed`) and the tree
    lives on the CPU in fp32 (DESIGN-NOTES 8), its samples moved to the latents' device. On a
    CPU fp32 run this is exactly diffusers' scheduler with ``noise_sampler_seed`` = that draw.
    """
    if not hasattr(scheduler, "noise_sampler_seed") or generator is None:
        return
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    seed = sde_noise_seed(generator)
    sigmas = scheduler.sigmas
    tree = BrownianTreeNoiseSampler(torch.zeros(x.shape, dtype=torch.float32), float(sigmas[sigmas > 0].min()),
                                    float(sigmas.max()), seed)
    scheduler.noise_sampler_seed = seed
    scheduler.noise_sampler = lambda s, s_next: tree(torch.as_tensor(s).cpu(), torch.as_tensor(s_next).cpu()).to(
        x.device, x.dtype)


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
    # Heun-type schedulers (DPM++ SDE) evaluate the UNet twice per step but the last: 2N - 1 timesteps
    two_evals = hasattr(scheduler, "state_in_first_order")
    expected = 2 * config.steps - 1 if two_evals else config.steps
    if len(scheduler.timesteps) != expected:
        raise ValueError(f"scheduler gave {len(scheduler.timesteps)} timesteps for steps={config.steps}")
    x = noise * scheduler.init_noise_sigma  # (B, 4, h, w)
    variants = step_variants(config)
    step_kwargs = _step_kwargs(scheduler, generator)
    _seed_sde_noise(scheduler, x, generator)
    combine = acfg if config.mode == "acfg" else cfg
    i = 0
    for t in scheduler.timesteps:
        if not two_evals or scheduler.state_in_first_order:
            i += 1  # both evaluations of a step use that step's gates
        variant = variants[i - 1]
        x_in = scheduler.scale_model_input(x, t)
        uncond_variant = BASE if config.mode == "acfg" else variant
        eps_cond, eps_uncond = denoise([UNetCall(x_in, t, cond, variant), UNetCall(x_in, t, uncond, uncond_variant)])
        eps = combine(eps_cond, eps_uncond, config.omega)
        x = scheduler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
        if callback is not None and (not two_evals or scheduler.state_in_first_order):
            callback(i, config.steps, x)
    return x
