"""Peak resident memory per phase of an export (``craft export --memory-phases``).

Linux keeps one high-water mark of a process's resident set (``VmHWM`` in ``/proc/self/status``),
and ``echo 5 > /proc/self/clear_refs`` sets it back to the current resident set. :class:`PhasePeaks`
reads the mark and resets it at every phase boundary, so each phase gets the peak reached while it
ran (a nested phase's peak counts for the phases around it too); time outside every phase is
``other``. The peak of the whole run is the largest mark read.

Opt-in (:func:`track_phases`), because the reset is process-wide: after it ``getrusage``'s
``ru_maxrss`` (``/usr/bin/time``, a parent's ``RUSAGE_CHILDREN``) only covers what came after
the last reset, so a caller measuring the process from outside must take :attr:`PhasePeaks.peak`
as well. Where the mark cannot be reset (not Linux, ``/proc`` read-only), each phase records the
peak *so far* (``resettable`` is False: the figures are upper bounds, not per-phase peaks).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["PhasePeaks", "track_phases", "phase"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_ACTIVE: contextvars.ContextVar[PhasePeaks | None] = contextvars.ContextVar("craft_phase_peaks", default=None)


def _read_hwm() -> int | None:
    """The process's resident high-water mark in bytes, or None where /proc has none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PhasePeaks:
    """Peak resident bytes per phase name (``"unet_base/parity_ort"``), in the order phases began."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.peak = 0  # the whole run's (every mark read)
        self.available = _read_hwm() is not None
        self.resettable = self.available and _reset_hwm()
        self._stack: list[str] = []

    def _mark(self) -> None:
        hwm = _read_hwm()
        if hwm is None:
            return
        self.peak = max(self.peak, hwm)
        for name in self._stack or ["other"]:
            self.peaks[name] = max(self.peaks.get(name, 0), hwm)
        if self.resettable:
            _reset_hwm()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the peak of the block to ``name`` (prefixed by the enclosing phases' names)."""
        full = "/".join([*self._stack[-1:], name])
        self._mark()  # what came before belongs to the enclosing phases
        self._stack.append(full)
        self.peaks.setdefault(full, 0)
        try:
            yield
        finally:
            self._mark()
            self._stack.pop()
            log.info("memory: %s peaked at %.2f GiB resident", full, self.peaks[full] / 2**30)

    def finish(self) -> None:
        self._mark()

    def summary(self) -> dict:
        """JSON-ready: ``{"peak_bytes", "resettable", "phases": {name: bytes}}``."""
        return {"peak_bytes": self.peak, "resettable": self.resettable, "phases": dict(self.peaks)}


@contextlib.contextmanager
def track_phases(enabled: bool = True) -> Iterator[PhasePeaks | None]:
    """Record :func:`phase` peaks for the block (None when not ``enabled`` or /proc has no VmHWM)."""
    if not enabled:
        yield None
        return
    peaks = PhasePeaks()
    if not peaks.available:
        log.info("memory: no VmHWM in %s: phase peaks not recorded", _STATUS)
        yield None
        return
    token = _ACTIVE.set(peaks)
    try:
        yield peaks
    finally:
        peaks.finish()
        _ACTIVE.reset(token)
        log.info("memory: export peaked at %.2f GiB resident", peaks.peak / 2**30)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A phase of the :func:`track_phases` run in progress (nothing when none is)."""
    peaks = _ACTIVE.get()
    if peaks is None:
        yield
        return
    with peaks.phase(name):
        yield
