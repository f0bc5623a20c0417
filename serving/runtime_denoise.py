"""The sampling loop's denoiser over baked sessions and the runtime-LoRA network (issue 14).

Per step, the loop asks for the conditional call (the step's variant) and the unconditional one
(W_init under ACFG, Eq. 10). :class:`RoutedDenoiser` runs a call on a baked session when the
repository has one for its variant (``baked(variant)``: hot pairs, W_init) and otherwise on the
runtime network; when any call of the step goes to the runtime network, the W_init calls join it
(gates 0), so ACFG's two branches are ONE batch-2 call. Gates come from the variants, so
continuous ``gamma_c`` / ``gamma_s`` need no baking. :meth:`RoutedDenoiser.run` does the same per row
of one batch (the repository's ``unet`` model, :mod:`.unet_weights`, runs it on what Triton batched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from craft_ops.aggregate import Variant
from craft_ops.conditioning import unet_inputs
from craft_ops.sampling import UNetCall

__all__ = ["RoutedDenoiser"]

Session = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]  # UNet inputs -> noise_pred
Runtime = Callable[[Mapping[str, torch.Tensor], Sequence[Variant]], torch.Tensor]  # RuntimeUNet.__call__


class RoutedDenoiser:
    """``denoise(calls) -> [eps]`` for :func:`craft_ops.sampling.sample`; see the module docstring.

    ``runtime``: a :class:`~craft_serving.runtime_unet.RuntimeUNet` (or anything with its call);
    ``baked``: the baked session of a variant, or None when the repository has none.
    """

    def __init__(self, runtime: Runtime, baked: Callable[[Variant], Session | None] = lambda v: None):
        self.runtime = runtime
        self.baked = baked

    def route(self, variants: Sequence[Variant]) -> list[Session | None]:
        """Per row: its baked session, or None for the runtime network (which W_init rows then join)."""
        found = {v: self.baked(v) for v in dict.fromkeys(variants)}  # asked once per call, however many rows
        sessions = [found[v] for v in variants]
        if any(s is None for s in sessions):  # W_init rides along with the runtime call
            sessions = [None if v.is_base else s for v, s in zip(variants, sessions)]
        return sessions

    def run(self, inputs: Mapping[str, torch.Tensor], variants: Sequence[Variant]) -> torch.Tensor:
        """``noise_pred`` of a batch whose row b runs on ``variants[b]``'s weights: rows on one baked
        session in one call on it, the runtime rows in one runtime call; a session whose ``waits`` is true
        after the others."""
        n = int(inputs["sample"].shape[0])
        if len(variants) != n:
            raise ValueError(f"variants: {len(variants)} for a batch of {n}")
        groups: dict[int, tuple[Session | None, list[int]]] = {}
        for b, session in enumerate(self.route(variants)):
            groups.setdefault(id(session) if session is not None else 0, (session, []))[1].append(b)
        if len(groups) == 1:  # the common case: no gather, no scatter
            session, rows = next(iter(groups.values()))
            return session(inputs) if session is not None else self.runtime(inputs, list(variants))
        out: torch.Tensor | None = None
        # a session still waiting for its weights (fed weights merged on a worker, :mod:`.fed_unet`) runs
        # last, so the merge overlaps the other rows' calls (sorted() keeps the order otherwise)
        for session, rows in sorted(groups.values(), key=lambda g: bool(getattr(g[0], "waits", False))):
            index = torch.tensor(rows)
            part = {k: v.index_select(0, index) for k, v in inputs.items()}
            eps = session(part) if session is not None else self.runtime(part, [variants[b] for b in rows])
            if out is None:
                out = eps.new_empty((n, *eps.shape[1:]))
            out.index_copy_(0, index, eps)
        return out  # type: ignore[return-value]

    def __call__(self, calls: Sequence[UNetCall]) -> list[torch.Tensor]:
        parts = [unet_inputs(c.x, c.t, c.cond) for c in calls]
        sizes = [int(p["sample"].shape[0]) for p in parts]
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]
        variants = [c.variant for c, n in zip(calls, sizes) for _ in range(n)]
        return list(torch.split(self.run(merged, variants), sizes))
