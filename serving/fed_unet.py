"""W_init's graph with the routed weights as inputs: a new variant at near-baked speed, nothing to build.

A variant the runner has not merged (:mod:`.merged_unet`) would run on the runtime-LoRA network,
whose ``B (A x)`` branches cost, at rank 64 on a narrow UNet, a large share of the UNet's work. Its
merged weights (``W = W_init + gamma_c dW^c + gamma_s dW^s``, Eq. 8, one matmul per routed module),
though, take milliseconds to compute; what takes seconds is opening an ONNX Runtime session on
them. :class:`FedWeights` opens ONE session, once, of W_init's graph in which every routed weight
(the runtime layout's modules) is a graph input instead of an initializer, and feeds each call the
weights of its variant: W_init's own arrays for the modules the variant leaves alone, its merged
arrays for the others. Every other weight is the runner's shared W_init value.

The price against a baked session: ONNX Runtime cannot pre-pack fed weights (a linear weight's
transpose and packing, a conv's blocked layout happen per call): +4 % per batch-1 UNet call on the
larger benchmark preset on an idle machine, +9-10 % at batch 1-2 beside another busy core. Only the
conditional row pays it: the unconditional row of an ACFG step runs on W_init's own session (a batch
of rows on different weight sets is one call per set).

A merge runs on a worker thread (numpy releases the GIL): the runner's call goes on with its other
rows (an ACFG step's unconditional row runs on W_init's own session; :class:`~.runtime_denoise.
RoutedDenoiser` runs a call whose weights are still being merged last), so on a machine with a free
core a new LoRA's merge costs its step almost nothing.

Held: the merged arrays of at most ``capacity`` LoRA-at-a-gate units (:class:`FedWeights`; least
recently used dropped first; fp32, the size of the weights the LoRA touches). The arrays of the last
two units dropped are kept as spare memory that later merges write into: on the VM the benchmarks
ran on, first-touch page faults of fresh arrays cost ~1 ms per MiB, most of a merge's time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from craft_export.ort import OrtSession
from craft_export.unet_runner import FED_VARIANTS

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_FED_VARIANTS", "FedCall", "FedWeights", "Merged", "Unit", "check_count", "fed_graph"]

Unit = tuple[str, str, str, float]  # (kind, LoRA name, its factors key, gate)
Merge = Callable[[Callable[[str], "np.ndarray | None"]], dict]  # merge(spare) -> {initializer: merged array}

DEFAULT_FED_VARIANTS = FED_VARIANTS  # LoRA-at-a-gate units the fed session keeps merged (the unet model's parameter)


def check_count(field: str, value, low: int = 0) -> None:
    """A config count (``merge_after``, ``fed_variants``, ...): an int >= ``low``, else ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field}: must be an integer >= {low}, got {value!r}")


def fed_graph(base_onnx: Path, names: set[str]) -> bytes:
    """``base_onnx``'s graph (its external data not read) with the initializers ``names`` turned into inputs."""
    import onnx
    from onnx import helper

    model = onnx.load(str(base_onnx), load_external_data=False)
    moved = [t for t in model.graph.initializer if t.name in names]
    kept = [t for t in model.graph.initializer if t.name not in names]
    missing = names - {t.name for t in moved}
    if missing:
        raise ValueError(f"{base_onnx}: no initializer named {sorted(missing)[0]!r}")
    for t in moved:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model.SerializeToString()


class Merged:
    """One unit's merged weights: the initializers it changes (known before the merge) and their arrays,
    made now or by a merge still running on the worker (:meth:`arrays` waits for it)."""

    __slots__ = ("names", "_arrays", "_future")

    def __init__(self, names: frozenset[str], arrays: dict[str, np.ndarray] | None = None,
                 future: Future | None = None):
        self.names, self._arrays, self._future = names, arrays, future

    @property
    def ready(self) -> bool:
        return self._future is None or self._future.done()

    def arrays(self) -> dict[str, np.ndarray]:
        """The merged arrays (waits for the merge; raises what it raised)."""
        if self._arrays is None:
            self._arrays = self._future.result()  # type: ignore[union-attr]
            self._future = None
        return self._arrays

    def done_arrays(self) -> dict[str, np.ndarray] | None:
        """The arrays if the merge finished well (after :meth:`FedWeights.settle`), else None."""
        if self._future is not None and (not self._future.done() or self._future.exception() is not None):
            return None
        return self.arrays()


class FedCall:
    """The denoiser callable of one variant on the fed session: its units' merged arrays fed in place of
    W_init's. ``waits``: a unit's merge is still running (the caller runs such calls last)."""

    def __init__(self, fed: "FedWeights", session: OrtSession, parts: Sequence[Merged], names: frozenset[str],
                 arrays: Mapping[str, np.ndarray]):
        self.fed, self.session, self.parts, self.names, self.w_init = fed, session, parts, names, arrays

    @property
    def waits(self) -> bool:
        return not all(p.ready for p in self.parts)

    def __call__(self, inputs):
        changed: dict[str, np.ndarray] = {}
        try:
            for part in self.parts:
                changed.update(part.arrays())
        except BaseException:
            self.fed.forget(self.parts)  # a failed merge is not held: the next call merges again
            raise
        feeds = {n: changed[n] if n in changed else self.w_init[n] for n in self.names}
        return self.session.run_torch({**inputs, **feeds})["noise_pred"]


class FedWeights:
    """See the module docstring. ``base_onnx``: W_init's ``model.onnx``; ``names``: the routed weights'
    initializers (those kept in W_init's external data files become inputs; a variant touching another
    is never fed); ``shared()``: the runner's W_init weights as ``(arrays, OrtValues)`` by name.

    Merged weights are held per LoRA at a gate (a *unit*: ``(kind, name, factors key, gate)`` ->
    ``{initializer: W_init + gate B A}`` for the modules the LoRA touches): a content LoRA's modules
    and a style LoRA's are disjoint (the runtime layout gives each module one kind), so a variant's
    weights are the union of its units, and the content + style variant of a request reuses what its
    content-only and style-only steps merged. At most ``capacity`` units are held (LRU).
    ``background``: merge on a worker thread (False: in the call that needs it).
    """

    def __init__(self, base_onnx: Path, names: set[str], shared: Callable[[], tuple[Mapping, Mapping]], *,
                 threads: int = 0, capacity: int = DEFAULT_FED_VARIANTS, background: bool = True):
        check_count("fed_variants", capacity)
        self.base_onnx, self.routed, self.shared = Path(base_onnx), frozenset(names), shared
        self.threads, self.capacity = threads, capacity
        self.names: frozenset[str] = frozenset()  # the graph's weight inputs, once opened
        self.session: OrtSession | None = None
        self.units: OrderedDict[Unit, Merged] = OrderedDict()
        self.merges = 0  # units merged so far
        self._spare: deque[dict[str, np.ndarray]] = deque(maxlen=2)  # arrays of the last units dropped
        self._dropped: list[Merged] = []  # dropped during the current call: maybe in use
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="craft-fed-merge") if background else None
        self._running: list[Future] = []  # merges submitted since the last :meth:`release`

    def _open(self) -> OrtSession:
        if self.session is None:
            arrays, values = self.shared()
            self.names = self.routed & set(arrays)
            given = {n: v for n, v in values.items() if n not in self.names}
            self.session = OrtSession(fed_graph(self.base_onnx, set(self.names)), threads=self.threads,
                                      initializers=given, folder=self.base_onnx.parent)
            log.info("fed weights: W_init's graph opened with %d routed weights as inputs", len(self.names))
        return self.session

    def unit(self, unit: Unit, prepare: Callable[[], tuple[frozenset[str], Merge] | None]) -> Merged | None:
        """The merged weights of ``unit``, held, or being made: ``prepare()`` (on this thread) gives the
        initializers the unit changes and ``merge(spare)`` (any thread), or None if it cannot be fed."""
        held = self.units.get(unit)
        if held is not None:
            self.units.move_to_end(unit)
            return held
        prepared = prepare()
        if prepared is None:
            return None
        names, merge = prepared
        self.merges += 1
        if self._pool is None:
            made = Merged(names, arrays=merge(self.spare))
        else:
            future = self._pool.submit(merge, self.spare)
            self._running.append(future)
            made = Merged(names, future=future)
        if self.capacity:
            self.units[unit] = made
            while len(self.units) > self.capacity:
                self._drop(next(iter(self.units)))
        return made

    def forget(self, parts: Sequence[Merged]) -> None:
        """Stop holding these (a merge among them failed)."""
        for unit in [u for u, m in self.units.items() if any(m is p for p in parts)]:
            del self.units[unit]

    def keep(self, ok: Callable[[Unit], bool]) -> None:
        """Drop the held units for which ``ok(unit)`` is false."""
        for unit in [u for u in self.units if not ok(u)]:
            self._drop(unit)

    def clear(self) -> None:
        for unit in list(self.units):
            self._drop(unit)

    def close(self) -> None:
        """No more merges (the runner is replaced); one running finishes on its own."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _drop(self, unit: Unit) -> None:
        """Forget a unit; its arrays become spare memory once the current call is over (:meth:`release`):
        a callable made earlier in this call may still feed them."""
        self._dropped.append(self.units.pop(unit))

    def settle(self) -> None:
        """Wait for every merge submitted so far (their failures are their callers' to raise)."""
        for future in self._running:
            future.exception()
        self._running.clear()

    def release(self) -> None:
        """A new runner call starts (none before it is running: the runner's lock): what earlier calls
        dropped may be written over once their merges are over (the worker reads the spare arrays)."""
        self.settle()
        self._spare.extend(a for a in (m.done_arrays() for m in self._dropped) if a is not None)
        self._dropped.clear()

    def spare(self, name: str) -> np.ndarray | None:
        """A dropped unit's fp32 array for weight ``name`` (same module, so same shape), or None."""
        for arrays in self._spare:
            array = arrays.get(name)
            if array is not None and array.dtype == np.float32:
                return arrays.pop(name)
        return None

    def call(self, parts: Sequence[Merged]) -> FedCall | None:
        """The denoiser callable of a variant made of the units ``parts`` (the rest: W_init's weights), or
        None if it changes a weight that is not an input."""
        session = self._open()
        if not all(self.names.issuperset(p.names) for p in parts):
            return None
        arrays, _ = self.shared()
        return FedCall(self, session, parts, self.names, arrays)
