"""Runtime LoRAs merged into W_init's graph for the variants a server keeps using (issue 14).

The runtime-LoRA network pays for its LoRA branches on every call (``B (A x)`` beside every routed
weight; at rank 64 on a narrow UNet that is a large share of the work). A request's conditional
branch, though, keeps one variant (content, gamma_c, style, gamma_s) for many steps: the gates only
change at the time-gate window edges. :class:`MergedVariants` bakes such a variant *in memory*:
``W = W_init + gamma_c dW^c + gamma_s dW^s`` (Eq. 8) for the routed modules it touches, computed
from the repository's factor files (``dW = B A``, alpha/rank already in ``B``), handed to an ONNX
Runtime session of W_init's own graph in place of the file's values
(``SessionOptions.add_external_initializers``, applied before graph optimization; every other
weight is given as the runner's shared W_init value). Its calls then cost what a baked variant's calls cost.

Policy: a variant is merged once ``after`` UNet calls had rows of it (default 2: a variant seen
once, such as a step on a time-gate window edge, never costs a session); at most ``capacity`` merged
variants are held (least recently used closed first; 0 turns merging off). A build costs the merge
(one matmul per routed module) plus opening a session (about 1.6 s on the larger benchmark preset,
about 1 s on the tiny one). By default it runs on one worker thread (ONNX Runtime releases the GIL
while it opens a session) and until it is ready the variant's calls run on the fed session
(:mod:`.fed_unet`: W_init's graph with the routed weights as inputs, fed the variant's merged
weights, which take milliseconds, not a session, to make), or with ``fed=0`` on the runtime network,
so a request never waits for a build. A background build also waits until the runner has had no UNet
call for ``idle_ms`` (default 250 ms; a request's steps come milliseconds apart): on a CPU server
the build would take the cores the requests' steps use (measured on 2 cores: a first request at
+14-18 % over baked with builds beside it, +6-7 % on the fed session alone), so builds run between
requests, and a server that is never idle keeps its variants on the fed session;
``background=False`` builds inside the call that triggers it (which network a step runs on then
depends only on the sequence of calls, not on timing). Either way the merged and the runtime network
agree to fp32 rounding (the tests hold both to the baked variants at 1e-4). A merged variant holds
its changed weights (fp32) and the session's own prepacked kernels.

A LoRA whose factor file changed (re-registered) or was removed is dropped with the manifest that
says so (:meth:`MergedVariants.keep_only`); a new W_init drops everything. A build that fails (say,
out of memory) leaves its variant on the runtime network and is tried again after ``after * 8**k``
more calls (k = failures so far), at most :data:`BUILD_TRIES` times; a variant whose weights cannot be
replaced (embedded in the graph) is never merged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from craft_export.ort import OrtSession
from craft_export.unet_runner import MERGE_AFTER, MERGE_IDLE_MS, MERGED_VARIANTS
from craft_ops.aggregate import Variant
from craft_ops.runtime_lora import RuntimeLayout

from .fed_unet import DEFAULT_FED_VARIANTS, FedWeights, check_count

log = logging.getLogger(__name__)

__all__ = ["BUILD_TRIES", "DEFAULT_IDLE_MS", "DEFAULT_MERGE_AFTER", "DEFAULT_MERGED_VARIANTS", "MergedVariants",
           "merge_weights", "one_blas_thread", "weight_name"]

DEFAULT_MERGE_AFTER = MERGE_AFTER  # calls of a variant before it is merged (the unet model's config parameter)
DEFAULT_MERGED_VARIANTS = MERGED_VARIANTS  # merged sessions held at once (likewise)
BUILD_TRIES = 3  # failed builds of one variant before it stays on the runtime network for good
DEFAULT_IDLE_MS = MERGE_IDLE_MS  # a background build starts once the runner had no call for this long

FactorKey = tuple[str | None, str | None]  # the variant's (content, style) factors keys
FactorsKey = Callable[[str, str], str]  # (LoRA name, kind) -> its factors key; raises for a LoRA not served
Factors = Callable[[str, str], Mapping[str, tuple[object, object]]]  # (name, kind) -> {module: (A, B)}


def weight_name(module: str) -> str:
    """The initializer of a UNet module's weight in an exported UNet graph (``UNetNet`` wraps the UNet)."""
    return f"inner.unet.{module}.weight"


_blas_lock = threading.Lock()
_blas_limited = False


def one_blas_thread() -> None:
    """numpy's BLAS on one thread for the rest of the process (``threadpoolctl``), once; the runner's
    merges are its only BLAS work.

    A rank-r ``B @ A`` is memory-bound: a second BLAS thread shortened a merge by a few ms on the
    benchmark VM but took a whole core, busy-waiting after each matmul (OpenBLAS), from the ONNX Runtime
    thread of the call running beside the merge (a first request's CPU time: +30 % over baked). Set once
    and left, not per merge: numpy 1.26's OpenBLAS (0.3.23) ignored a limit set from a worker thread
    once an earlier limit had been undone."""
    global _blas_limited
    with _blas_lock:
        if not _blas_limited:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=1, user_api="blas")
            _blas_limited = True


def merge_weights(layout: RuntimeLayout, terms: Mapping[str, list], w0: Mapping[str, np.ndarray],
                  spare: Callable[[str], np.ndarray | None] = lambda name: None) -> dict[str, np.ndarray]:
    """Eq. 8 per routed module: ``W_init + sum(gate * B A)`` by initializer name, in W_init's dtype
    (fp32 math); ``terms``: module -> [(gate, A, B), ...]; ``w0``: W_init's weights by initializer
    name; ``spare(name)``: a free fp32 array of that weight's shape to write into (or None: a new one;
    reusing memory spares the page faults of a fresh array, which dominate a merge on some VMs)."""
    by_name = {m.name: m for m in layout.modules}
    changed: dict[str, np.ndarray] = {}
    for module, gated in terms.items():
        name = weight_name(module)
        shape = by_name[module].shape
        w = spare(name)
        for i, (gate, A, B) in enumerate(gated):  # the gate scales the small A, not the product
            scaled = np.float32(gate) * A
            if i == 0 and w is not None:
                np.matmul(B, scaled, out=w.reshape(B.shape[0], -1))
            elif i == 0:
                w = (B @ scaled).reshape(shape)
            else:
                w += (B @ scaled).reshape(shape)
        base = w0[name]
        w = base.astype(np.float32, copy=True) if w is None else np.add(w, base, out=w)
        changed[name] = w.astype(base.dtype, copy=False)  # the graph's own dtype
    return changed


class _Merged:
    __slots__ = ("key", "session", "arrays", "values", "nbytes", "seconds")

    def __init__(self, key: FactorKey, session: OrtSession, arrays: dict[str, np.ndarray], values: dict,
                 seconds: float):
        # the session reads ``values`` (OrtValues over ``arrays``): both live as long as it does
        self.key, self.session, self.arrays, self.values, self.seconds = key, session, arrays, values, seconds
        self.nbytes = sum(a.nbytes for a in arrays.values())

    def __call__(self, inputs):
        return self.session.run_torch(inputs)["noise_pred"]


class MergedVariants:
    """See the module docstring.

    ``base_onnx``: W_init's ``model.onnx``; ``shared()``: its external weights as ``(arrays, OrtValues)``
    by initializer name (the runner's, loaded once); ``factors_key(name, kind)``: a served LoRA's factors
    key (raises, naming the field, for one it does not serve); ``factors(name, kind)``: its unpadded
    factors ``{module: (A (r, fan_in), B (d_out, r))}``. ``background``: build on a worker thread
    (the calls meanwhile run on the fed session or the runtime network), and merge fed units on another
    (:mod:`.fed_unet`); False: both inside the call that needs them. ``report(message)``: told when a
    merged variant starts serving (the Triton model's log). ``fed``: LoRA-at-a-gate units whose merged
    weights the fed session keeps (:mod:`.fed_unet`; 0: no fed session, a variant runs on the runtime
    network until merged). ``idle_ms``: a background build starts once no runner call has run
    (:meth:`touch` .. :meth:`idle`) for this long.

    Not thread-safe: one caller at a time (the runner's lock); the worker only computes.
    """

    def __init__(self, base_onnx: Path, layout: RuntimeLayout, shared: Callable[[], tuple[Mapping, Mapping]],
                 factors_key: FactorsKey, factors: Factors, *, threads: int = 0, after: int = DEFAULT_MERGE_AFTER,
                 capacity: int = DEFAULT_MERGED_VARIANTS, background: bool = True,
                 report: Callable[[str], None] | None = None, fed: int = DEFAULT_FED_VARIANTS,
                 idle_ms: int = DEFAULT_IDLE_MS):
        for field, value, low in (("merge_after", after, 1), ("merged_variants", capacity, 0),
                                  ("merge_idle_ms", idle_ms, 0)):
            check_count(field, value, low)
        if capacity or fed:
            one_blas_thread()
        self.base_onnx, self.layout, self.shared = Path(base_onnx), layout, shared
        self.factors_key, self.factors = factors_key, factors
        self.threads, self.after, self.capacity, self.report = threads, after, capacity, report
        self.held: OrderedDict[Variant, _Merged] = OrderedDict()
        self.calls: dict[Variant, int] = {}
        self.pending: dict[Variant, Future] = {}
        self.failures: dict[Variant, int] = {}  # failed builds per variant
        self.blocked: set[Variant] = set()  # never merged (weights embedded in the graph, or BUILD_TRIES failures)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="craft-merge") if background and capacity else None
        self.fed = FedWeights(self.base_onnx, {weight_name(m.name) for m in layout.modules}, shared, threads=threads,
                              capacity=fed, background=background) if fed else None
        self.built = 0  # sessions opened so far
        self.idle_s = idle_ms / 1000
        self._last_call = time.monotonic()  # when the runner's last UNet call ended (:meth:`idle`)
        self._calling = False  # a runner call is running (:meth:`touch` .. :meth:`idle`)
        self._closed = False
        self.build_seconds: list[float] = []
        self._embedded: list[str] | None = None  # W_init weights that cannot be merged into (logged once)

    def __call__(self, variant: Variant):
        """The call for ``variant``: its merged session when held, else the fed session with its merged
        weights (:mod:`.fed_unet`), else None (the runtime network)."""
        if variant.is_base:
            return None
        merged = self._session(variant) if self.capacity else None
        if merged is None and self.fed is not None:
            return self._fed_call(variant)
        return merged

    def _fed_call(self, variant: Variant):
        key = self._keys(variant)
        parts = []
        for kind, name, gate, factors_key in (("content", variant.content, variant.gamma_c, key[0]),
                                              ("style", variant.style, variant.gamma_s, key[1])):
            if name is None:
                continue
            part = self.fed.unit((kind, name, factors_key, gate), lambda: self._fed_merge(name, kind, gate))
            if part is None:  # a weight embedded in the graph: it cannot be fed either
                return None
            parts.append(part)
        return self.fed.call(parts)

    def _fed_merge(self, name: str, kind: str, gate: float):
        """For a fed unit: the weights one LoRA touches and ``merge(spare)`` making ``W_init + gate B A``
        for them (any thread), or None if one is embedded in the graph."""
        gated = self._gated(((kind, name, gate),))
        if gated is None:
            return None
        terms, w0 = gated
        return frozenset(w0), lambda spare: merge_weights(self.layout, terms, w0, spare=spare)

    def _session(self, variant: Variant):
        """The merged session of ``variant`` if held; else None, its build scheduled by the policy."""
        self._collect()
        held = self.held.get(variant)
        if held is not None:
            if held.key == self._keys(variant):
                self.held.move_to_end(variant)
                return held
            del self.held[variant]  # its LoRA was re-registered since
        if variant in self.pending or variant in self.blocked:
            return None
        count = self.calls[variant] = self.calls.get(variant, 0) + 1
        if count < self.after:
            if len(self.calls) > 64 * max(1, self.capacity):  # a server with ever-new gammas: forget counts
                self.calls = {variant: count}
            return None
        self.calls.pop(variant, None)
        job = self._prepare(variant)
        if job is None:
            if len(self.blocked) >= 64 * max(1, self.capacity):  # ever-new gammas: keep the set bounded
                self.blocked.clear()
            self.blocked.add(variant)
            return None
        if self._pool is not None:
            self.pending[variant] = self._pool.submit(self._build_when_idle, variant, *job)
            return None
        try:
            merged = self._build(variant, *job)
        except Exception as exc:  # noqa: BLE001 - the call itself still runs, on the runtime network
            self._failed(variant, exc)
            return None
        return self._hold(variant, merged)

    def wait(self) -> None:
        """Let every build in progress finish and hold its result."""
        for future in list(self.pending.values()):
            future.exception()
        self._collect()

    def clear(self) -> None:
        """Close every merged variant and forget the call counts (builds in progress are waited for)."""
        self.wait()
        self.held.clear()
        self.calls.clear()
        self.failures.clear()
        self.blocked.clear()
        if self.fed is not None:
            self.fed.clear()

    def touch(self) -> None:
        """A runner call starts, none other running (background builds wait for a quiet moment; the fed
        session may reuse what earlier calls dropped). Each is followed by :meth:`idle`."""
        self._calling = True
        if self.fed is not None:
            self.fed.release()

    def idle(self) -> None:
        """The runner call is over: the quiet time of background builds counts from now."""
        self._last_call = time.monotonic()
        self._calling = False

    def _build_when_idle(self, variant: Variant, *job) -> "_Merged | None":
        """On the worker: wait until no runner call has run for ``idle_s`` (a build takes the cores a
        request's steps would use; a call longer than ``idle_s`` is not a quiet moment), then build; None
        if discarded meanwhile."""
        while not self._closed:
            quiet = 0.0 if self._calling else time.monotonic() - self._last_call
            if quiet >= self.idle_s:
                return self._build(variant, *job)
            time.sleep(min(self.idle_s - quiet, 0.05) + 0.001)
        return None

    def discard(self) -> None:
        """Drop everything now (a new W_init or runtime network): builds in progress are not waited for."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.fed is not None:
            self.fed.close()
        self.held.clear()
        self.calls.clear()
        self.pending.clear()
        self.failures.clear()
        self.blocked.clear()

    def keep_only(self, keys: Mapping[str, str]) -> None:
        """Drop merged variants whose LoRAs are not served with these factors keys (name -> key) any more."""
        for variant in [v for v, m in self.held.items()
                        if any(n is not None and keys.get(n) != k for n, k in zip((v.content, v.style), m.key))]:
            del self.held[variant]
        served = lambda v: all(n is None or n in keys for n in (v.content, v.style))  # noqa: E731
        self.calls = {v: c for v, c in self.calls.items() if served(v)}
        self.failures = {v: n for v, n in self.failures.items() if served(v)}
        self.blocked = {v for v in self.blocked if served(v)}
        if self.fed is not None:
            self.fed.keep(lambda unit: keys.get(unit[1]) == unit[2])

    @property
    def nbytes(self) -> int:
        """The changed weights held by merged variants (their sessions' kernels come on top)."""
        return sum(m.nbytes for m in self.held.values())

    def _collect(self) -> None:
        for variant in [v for v, f in self.pending.items() if f.done()]:
            future = self.pending.pop(variant)
            exc = future.exception()
            if exc is not None:
                self._failed(variant, exc)
            elif future.result() is not None:
                self._hold(variant, future.result())

    def _failed(self, variant: Variant, exc: BaseException) -> None:
        n = self.failures[variant] = self.failures.get(variant, 0) + 1
        if n >= BUILD_TRIES:
            self.blocked.add(variant)
            log.warning("merged variants: merging %s failed %d times, it stays on the runtime network: %s",
                        variant, n, exc)
            return
        wait = self.after * 8**n
        self.calls[variant] = self.after - wait  # the build is tried again on the ``wait``-th call from now
        log.warning("merged variants: merging %s failed (try %d of %d), it runs on the runtime network and is "
                    "tried again after %d more calls: %s", variant, n, BUILD_TRIES, wait, exc)

    def _hold(self, variant: Variant, merged: "_Merged") -> "_Merged":
        while len(self.held) >= self.capacity:
            old, gone = self.held.popitem(last=False)
            log.info("merged variants: closing %s (%.1f MiB)", old, gone.nbytes / 2**20)
        self.held[variant] = merged
        if self.report is not None:
            self.report(f"merged variant {variant} serving (built in {merged.seconds:.2f} s, "
                        f"{merged.nbytes / 2**20:.1f} MiB of merged weights, {len(self.held)} held)")
        return merged

    # -- building ---------------------------------------------------------------------------------

    def _keys(self, variant: Variant) -> FactorKey:
        return (self.factors_key(variant.content, "content") if variant.content else None,
                self.factors_key(variant.style, "style") if variant.style else None)

    def _w0(self, names: set[str], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """W_init's values of ``names`` (the runner's external weights); None if one is embedded in the
        graph (ONNX Runtime can replace external initializers only: such a variant is not merged)."""
        missing = names - set(arrays)
        if missing:
            if self._embedded is None:
                self._embedded = sorted(missing)
                log.warning("merged variants: %s (and %d more) is not in an external data file of %s; variants "
                            "touching such weights stay on the runtime network", self._embedded[0],
                            len(missing) - 1, self.base_onnx)
            return None
        return {n: arrays[n] for n in names}

    def _gated(self, loras) -> tuple[dict[str, list], dict[str, np.ndarray]] | None:
        """Eq. 8's terms for ``loras`` (``(kind, name, gate)``; a None name is skipped): module ->
        ``[(gate, A, B), ...]``, with W_init's values of the weights they touch; None if one is embedded in
        the graph."""
        terms: dict[str, list] = {}
        for kind, name, gate in loras:
            if name is None:
                continue
            for module, (A, B) in self.factors(name, kind).items():
                terms.setdefault(module, []).append((gate, np.asarray(A, np.float32), np.asarray(B, np.float32)))
        arrays, _ = self.shared()
        w0 = self._w0({weight_name(m) for m in terms}, arrays)
        return None if w0 is None else (terms, w0)

    def _prepare(self, variant: Variant):
        """On the caller's thread: the variant's factors keys, gated factors and W_init values, or None."""
        key = self._keys(variant)
        gated = self._gated((("content", variant.content, variant.gamma_c), ("style", variant.style, variant.gamma_s)))
        return None if gated is None else (key, *gated, self.shared()[1])

    def _build(self, variant: Variant, key: FactorKey, terms: Mapping[str, list], w0: Mapping[str, np.ndarray],
               values: Mapping) -> _Merged:
        """Eq. 8 for the variant's modules, then W_init's graph opened with them (any thread)."""
        import onnxruntime as ort

        t0 = time.perf_counter()
        changed = merge_weights(self.layout, terms, w0)
        own = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in changed.items()}
        session = OrtSession(self.base_onnx, threads=self.threads, external=own,
                             initializers={n: v for n, v in values.items() if n not in changed})
        seconds = time.perf_counter() - t0
        self.built += 1
        self.build_seconds.append(seconds)
        merged = _Merged(key, session, changed, own, seconds)
        log.info("merged variants: %s merged into W_init's graph in %.2f s (%d weights, %.1f MiB)",
                 variant, seconds, len(changed), merged.nbytes / 2**20)
        return merged
