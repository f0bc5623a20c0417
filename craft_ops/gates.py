"""Prompt gates (CRAFT-LoRA Eq. 6) and time gates (Eq. 9).

Step numbering (DESIGN-NOTES 1): step 1 is the noisiest; step i of N (1-based) is inside
the window ``[a, b]`` when ``a <= (i - 1) / N < b``, with ``b = 1.0`` inclusive of the
last step. Paper defaults: content ``[0.0, 0.7]``, style ``[0.28, 1.0]`` (N = 50: steps
1-35 and 15-50).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "GateError",
    "PromptGates",
    "Window",
    "DEFAULT_CONTENT_WINDOW",
    "DEFAULT_STYLE_WINDOW",
    "parse_prompt",
    "check_gamma",
    "step_gates",
    "gate_schedule",
]


class GateError(ValueError):
    """A gate value or window that the method cannot use."""


_TOKEN_RE = re.compile(r"</?\s*([cs])\s*>", re.IGNORECASE)


@dataclass(frozen=True)
class PromptGates:
    """Routing gates read from a prompt, and the prompt the text encoder sees (Eq. 6)."""

    gamma_c: float
    gamma_s: float
    text: str  # e_sem input: the prompt with routing tokens stripped
    has_content_token: bool
    has_style_token: bool


@dataclass(frozen=True)
class Window:
    """A time-gate window as fractions ``[start, end]`` of the trajectory (Eq. 9)."""

    start: float
    end: float

    def __post_init__(self) -> None:
        for field, v in (("start", self.start), ("end", self.end)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise GateError(f"window {field} must be a finite fraction in [0, 1], got {v!r}")
        if self.start >= self.end:
            raise GateError(f"window start must be below end, got [{self.start}, {self.end}]")

    @classmethod
    def of(cls, value: "Window | tuple[float, float] | list[float]", field: str = "window") -> "Window":
        if isinstance(value, Window):
            return value
        try:
            start, end = (float(v) for v in value)
        except (TypeError, ValueError) as exc:
            raise GateError(f"{field} must be two fractions [start, end], got {value!r}") from exc
        try:
            return cls(start, end)
        except GateError as exc:
            raise GateError(f"{field}: {exc}") from exc

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.start, self.end)

    def contains(self, step: int, num_steps: int) -> bool:
        """Whether 1-based ``step`` of ``num_steps`` lies in the window."""
        if num_steps <= 0 or not 1 <= step <= num_steps:
            raise GateError(f"step must be in [1, {num_steps}], got {step}")
        frac = (step - 1) / num_steps
        return self.start <= frac and (frac < self.end or self.end >= 1.0)

    def steps(self, num_steps: int) -> list[int]:
        """The 1-based steps of an ``num_steps`` trajectory inside the window."""
        return [i for i in range(1, num_steps + 1) if self.contains(i, num_steps)]


# The paper's windows (DESIGN-NOTES 1): every default window of requests, recipes and sampling.
DEFAULT_CONTENT_WINDOW = Window(0.0, 0.7)
DEFAULT_STYLE_WINDOW = Window(0.28, 1.0)


def check_gamma(value: float, field: str) -> float:
    """A continuous gate override must be a finite number in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise GateError(f"{field} must be a number in [0, 1], got {value!r}") from exc
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise GateError(f"{field} must be a finite number in [0, 1], got {value!r}")
    return v


def parse_prompt(
    prompt: str, *, gamma_c: float | None = None, gamma_s: float | None = None
) -> PromptGates:
    """Prompt gates of Eq. 6: ``gamma = 1`` when ``<c>`` / ``<s>`` is present, else 0.

    ``</c>`` and ``</s>`` count as the same tokens; case and inner spaces are ignored.
    Overrides (continuous values in [0, 1]) replace the token-derived gates.
    """
    if not isinstance(prompt, str):
        raise GateError(f"prompt must be a string, got {type(prompt).__name__}")
    found = {m.group(1).lower() for m in _TOKEN_RE.finditer(prompt)}
    text = " ".join(_TOKEN_RE.sub(" ", prompt).split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    g_c = check_gamma(gamma_c, "gamma_c") if gamma_c is not None else float("c" in found)
    g_s = check_gamma(gamma_s, "gamma_s") if gamma_s is not None else float("s" in found)
    return PromptGates(g_c, g_s, text, "c" in found, "s" in found)


def step_gates(
    step: int,
    num_steps: int,
    gamma_c: float,
    gamma_s: float,
    content_window: Window = DEFAULT_CONTENT_WINDOW,
    style_window: Window = DEFAULT_STYLE_WINDOW,
) -> tuple[float, float]:
    """Effective gates at a step: prompt gate x time gate ``1[t in T]`` (Eq. 9)."""
    g_c = gamma_c if content_window.contains(step, num_steps) else 0.0
    g_s = gamma_s if style_window.contains(step, num_steps) else 0.0
    return g_c, g_s


def gate_schedule(
    num_steps: int,
    gamma_c: float,
    gamma_s: float,
    content_window: Window = DEFAULT_CONTENT_WINDOW,
    style_window: Window = DEFAULT_STYLE_WINDOW,
) -> list[tuple[float, float]]:
    """``[(gamma_c(t), gamma_s(t)) for t = 1..N]`` for a whole trajectory."""
    if num_steps <= 0:
        raise GateError(f"steps must be positive, got {num_steps}")
    return [step_gates(i, num_steps, gamma_c, gamma_s, content_window, style_window) for i in range(1, num_steps + 1)]
