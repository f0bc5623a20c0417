"""How long a streamed request may stay silent before the client calls it failed.

Why: Triton 2.51 never ends a request on a *decoupled* model whose Python stub process died
(``kill -9`` of the ``craft_pipeline_stream`` stub, the OOM killer): no error, no end of stream,
only the call's own deadline - many minutes, or never without one. craft serve's stub watchdog
reloads the model for new streams, but cannot end the old ones. The pipeline sends a message at
every sampling step, so a silence much longer than a step is itself the failure signal.

The bound (:class:`StallPolicy`): once a stream has delivered its first message, it fails with
:class:`~craft_client.errors.StreamStalled` (naming the model and the address) when nothing has
arrived for ``max(floor_s, factor x its longest gap between two messages so far)`` seconds -
``max(10 s, 10 x)`` by default (only the time the client spends waiting for the server counts;
time the caller spends between messages does not). The last step's gap includes the VAE decode and the result, a
preview step's the preview decode; the 10 s floor covers both for the sizes served here. The wait
for the first message (queueing, text encoding) is bounded by ``first_s`` when set (default:
only by the call's timeout). The client then cancels the request on the server and, when it has
other endpoints, runs the stream again on the next one (its progress starts over; the seed
makes the images the same).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import StreamStalled

__all__ = ["StallPolicy", "StallClock"]


@dataclass(frozen=True)
class StallPolicy:
    """``floor_s`` / ``factor``: the silence bound once a stream has started (module docstring);
    ``first_s``: the bound before its first message (None: none but the call's timeout)."""

    floor_s: float = 10.0
    factor: float = 10.0
    first_s: float | None = None

    def __post_init__(self) -> None:
        if not self.floor_s > 0:
            raise ValueError(f"floor_s: must be > 0 seconds, got {self.floor_s!r}")
        if not self.factor >= 1:
            raise ValueError(f"factor: must be >= 1, got {self.factor!r}")
        if self.first_s is not None and not self.first_s > 0:
            raise ValueError(f"first_s: must be > 0 seconds or None, got {self.first_s!r}")


class StallClock:
    """One stream's clock. Silence is the time the client spent *waiting* for the next message
    (:meth:`waited`); time the caller spends between two messages does not count. :meth:`message`
    on every message, :meth:`remaining` before each wait, :meth:`error` once it ran out."""

    def __init__(self, policy: StallPolicy | None, model: str, url: str):
        self.policy, self.model, self.url = policy, model, url
        self.silent = 0.0
        self.longest = 0.0
        self._started = False
        self.step = self.total = 0

    def waited(self, seconds: float) -> None:
        self.silent += seconds

    def message(self, step: int, total: int) -> None:
        if self._started:
            self.longest = max(self.longest, self.silent)
        self._started, self.silent = True, 0.0
        if step > 0:
            self.step, self.total = step, total

    def bound(self) -> tuple[float, str] | None:
        """(seconds, how they were derived), or None when nothing bounds the silence now."""
        p = self.policy
        if p is None:
            return None
        if not self._started:
            return None if p.first_s is None else (p.first_s, "first_s, the wait allowed for the first message")
        return (max(p.floor_s, p.factor * self.longest),
                f"max({p.floor_s:g} s, {p.factor:g} x its longest gap between messages, {self.longest:.2f} s)")

    def remaining(self) -> float | None:
        """Seconds the stream may still stay silent (<= 0: stalled), or None: unbounded."""
        bound = self.bound()
        return None if bound is None else bound[0] - self.silent

    def error(self) -> StreamStalled:
        seconds, how = self.bound()  # only called once remaining() ran out, so bounded
        return StreamStalled(self.model, self.url, silent=self.silent, bound=seconds, how=how, step=self.step,
                             total=self.total)
