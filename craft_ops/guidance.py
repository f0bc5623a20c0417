"""Guidance on noise predictions: ACFG (CRAFT-LoRA Eq. 11) and plain CFG."""

from __future__ import annotations

import math

import torch

__all__ = ["acfg", "cfg", "check_omega"]


def check_omega(omega: float, field: str = "guidance") -> float:
    """omega must be a finite, non-negative number."""
    try:
        v = float(omega)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} must be a number, got {omega!r}") from exc
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{field} must be a finite number >= 0, got {omega!r}")
    return v


def acfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, omega: float) -> torch.Tensor:
    """ACFG combination, CRAFT-LoRA Eq. 11: ``(1 + omega) eps_cond - omega eps_uncond``.

    ``eps_cond`` comes from W_init + gated deltas, ``eps_uncond`` from W_init (Eq. 10).
    """
    return eps_cond + omega * (eps_cond - eps_uncond)


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, omega: float) -> torch.Tensor:
    """Classifier-free guidance with ``guidance_scale = 1 + omega``; both branches on one set of weights."""
    return eps_uncond + (1.0 + omega) * (eps_cond - eps_uncond)
