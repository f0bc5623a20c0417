"""The sampling loop's denoiser over TensorRT UNet sessions, both ACFG branches in flight at once.

:class:`TrtDenoiser` is ``denoise(calls)`` for :func:`craft_ops.sampling.sample` over one
:class:`~craft_export.trt_session.TrtSession` per UNet weight variant. Calls that need the same
session are concatenated into one batched engine call (plain CFG: one batch-2 call); calls on
different sessions (ACFG: W_init for the unconditional branch, W_init + gated deltas for the
conditional one, Eq. 10) are launched on their sessions' own streams before either is waited for
(:func:`run_concurrent`), so the two UNets run concurrently on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from craft_export.trt_session import TrtSession
from craft_ops.conditioning import unet_inputs

__all__ = ["TrtDenoiser", "run_concurrent"]


def run_concurrent(jobs: Sequence[tuple[TrtSession, Mapping[str, Any]]], *, copy: bool = True) -> list[dict[str, Any]]:
    """Run each (session, inputs) job, all launched before any is waited for; outputs in job order.

    Sessions must be distinct (a session runs one call at a time: concatenate its inputs along
    the batch axis instead). Each session runs on its own stream, so the GPU may overlap them.
    Sessions are held in a fixed order, so concurrent callers cannot deadlock.
    """
    sessions = [s for s, _ in jobs]
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("run_concurrent: each session may appear once; batch its inputs instead")
    with ExitStack() as held:
        for session in sorted(sessions, key=id):
            held.enter_context(session.hold())
        launches = [session.launch(inputs) for session, inputs in jobs]
        return [launch.result(copy=copy) for launch in launches]


class TrtDenoiser:
    """``denoise(calls) -> [eps, ...]`` for :func:`craft_ops.sampling.sample` over TensorRT UNet sessions.

    ``sessions``: ``{Variant: TrtSession}`` or a callable ``Variant -> TrtSession``. Calls needing
    the same session are concatenated along the batch axis (CFG: one batch-2 call); different
    sessions (ACFG's two weight sets) run concurrently on their own streams when ``concurrent``.
    Each ``eps`` comes back on the device and in the dtype of its call's ``x`` (float32 CPU
    latents, as the reference loop uses, get a host copy; CUDA latents stay on the GPU).
    """

    def __init__(self, sessions: Mapping[Any, TrtSession] | Callable[[Any], TrtSession], *,
                 concurrent: bool = True, output: str = "noise_pred"):
        self._lookup = sessions.__getitem__ if isinstance(sessions, Mapping) else sessions
        self.concurrent = concurrent
        self.output = output

    def __call__(self, calls: Sequence[Any]) -> list[Any]:
        import torch

        groups: dict[int, tuple[TrtSession, list[int]]] = {}
        for i, call in enumerate(calls):
            session = self._lookup(call.variant)
            groups.setdefault(id(session), (session, []))[1].append(i)
        jobs, members = [], []
        for session, indices in groups.values():
            per_call = [unet_inputs(calls[i].x, calls[i].t, calls[i].cond) for i in indices]
            if len(indices) > 1 and _same_item_shapes(per_call):
                jobs.append((session, {n: torch.cat([p[n] for p in per_call]) for n in per_call[0]}))
                members.append(indices)
            else:  # different shapes: one job each (run in turn below)
                for i, p in zip(indices, per_call):
                    jobs.append((session, p))
                    members.append([i])
        results = self._run(jobs)
        eps: list[Any] = [None] * len(calls)
        for indices, out in zip(members, results):
            offset = 0
            for i in indices:
                n = calls[i].x.shape[0]
                eps[i] = out[self.output][offset: offset + n].to(device=calls[i].x.device, dtype=calls[i].x.dtype)
                offset += n
        return eps

    def _run(self, jobs):
        distinct = len({id(s) for s, _ in jobs}) == len(jobs)
        if self.concurrent and len(jobs) > 1 and distinct:
            return run_concurrent(jobs)
        return [session.run_torch(inputs) for session, inputs in jobs]


def _same_item_shapes(inputs: Sequence[Mapping[str, Any]]) -> bool:
    first = inputs[0]
    return all(set(p) == set(first) and all(tuple(p[n].shape[1:]) == tuple(first[n].shape[1:]) for n in first)
               for p in inputs[1:])
