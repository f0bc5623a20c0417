"""Guidance on noise predictions: ACFG (CRAFT-LoRA Eq. 11) and plain CFG."""

from __future__ import annotations

import math

from .lazy import torch

__all__ = ["GUIDANCE_MAX", "acfg", "cfg", "check_omega"]

# The largest omega a request, a recipe default or a sampling loop may use (guidance_scale 101):
# far past any useful value, low enough to refuse typos such as 750.
GUIDANCE_MAX = 100.0


def check_omega(omega: float, field: str = "guidance") -> float:
    """omega must be a finite number in ``[0, GUIDANCE_MAX]``."""
    try:
        v = float(omega)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} must be a number, got {omega!r}") from exc
    if not math.isfinite(v) or not 0.0 <= v <= GUIDANCE_MAX:
        raise ValueError(f"{field} must be a finite number in [0, {GUIDANCE_MAX:g}], got {omega!r}")
    return v


def acfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, omega: float) -> torch.Tensor:
    """ACFG combination, CRAFT-LoRA Eq. 11: ``(1 + omega) eps_cond - omega eps_uncond``.

    ``eps_cond`` comes from W_init + gated deltas, ``eps_uncond`` from W_init (Eq. 10).
    """
    return eps_cond + omega * (eps_cond - eps_uncond)


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, omega: float) -> torch.Tensor:
    """Classifier-free guidance with ``guidance_scale = 1 + omega``; both branches on one set of weights."""
    return eps_uncond + (1.0 + omega) * (eps_cond - eps_uncond)
