"""The sampling loop's denoiser over baked sessions and the runtime-LoRA network (issue 14).

Per step, the loop asks for the conditional call (the step's variant) and the unconditional one
(W_init under ACFG, Eq. 10). :class:`RoutedDenoiser` runs a call on a baked session when the
repository has one for its variant (``baked(variant)``: hot pairs, W_init) and otherwise on the
runtime network; when any call of the step goes to the runtime network, the W_init calls join it
(gates 0), so ACFG's two branches are ONE batch-2 call. Gates come from the variants, so
continuous ``gamma_c`` / ``gamma_s`` need no baking.
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

    def _route(self, calls: Sequence[UNetCall]) -> list[Session | None]:
        sessions = [self.baked(c.variant) for c in calls]
        if any(s is None for s in sessions):  # W_init rides along with the runtime call
            sessions = [None if c.variant.is_base else s for c, s in zip(calls, sessions)]
        return sessions

    def __call__(self, calls: Sequence[UNetCall]) -> list[torch.Tensor]:
        sessions = self._route(calls)
        out: list[torch.Tensor | None] = [None] * len(calls)
        runtime = []
        for i, (call, session) in enumerate(zip(calls, sessions)):
            if session is None:
                runtime.append(i)
            else:
                out[i] = session(unet_inputs(call.x, call.t, call.cond))
        if runtime:
            parts = [unet_inputs(calls[i].x, calls[i].t, calls[i].cond) for i in runtime]
            sizes = [int(p["sample"].shape[0]) for p in parts]
            merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            variants = [calls[i].variant for i, n in zip(runtime, sizes) for _ in range(n)]
            eps = self.runtime(merged, variants)  # one batched call: cond + uncond (+ more)
            for i, chunk in zip(runtime, torch.split(eps, sizes)):
                out[i] = chunk
        return out  # type: ignore[return-value]
