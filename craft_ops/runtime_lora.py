"""Runtime (unbaked) LoRA: factors and gates as network inputs instead of baked weights (CRAFT-LoRA Eq. 7-8).

A baked variant holds ``W_agg = W_init + gamma_c dW^c (I_c) + gamma_s dW^s (I_s)`` (Eq. 8). The
runtime network holds only ``W_init`` and adds, in every routed module i and for every sample b
of the batch,

    y_i[b] = W_init,i x[b] + s_k[b] * B_i[b] (A_i[b] x[b])      k = content for i in I_c, style for i in I_s

with the sample's own factors (zero-padded to a rank ``R`` fixed when the network is exported)
and scale ``s_k[b]`` = prompt gate x time gate (Eq. 9). The LoRA's ``alpha / rank`` is folded into
``B`` when the factors are prepared (it may differ per module), so the scale input is the gate
alone. Zero padding adds exact zeros, so with the same factors and gates this is the baked
variant up to floating-point summation order (the tests hold both to a stated tolerance).

What a runtime network takes: plain LoRA factors (``dW = alpha/rank * B @ A``) of ``nn.Linear``
modules and of ``nn.Conv2d`` modules of any kernel size (a k x k conv LoRA is a k x k conv ``A``
with ``r`` output channels followed by a 1x1 conv ``B``: :func:`lora_branch` computes ``A x`` as a
matmul on im2col columns, made by one depthwise conv with a one-hot kernel). Everything else is *baked-only* and refused by name (:class:`RuntimeLoraError`),
never dropped: Tucker LoCon (``lora_mid``), DoRA, LoHa, LoKr, full diffs, a rank above ``R``, and
modules the network has no branch for.

Factor banks (the serving cache) hold, per module, ``S`` slots of padded factors; slot 0 is all
zeros ("no LoRA"). A sample selects its slot by index, so samples with different LoRAs share one
batched call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .lazy import torch

from .lora import LoraAdapter, LoraError, LoraFactors
from .routing import Routing

__all__ = [
    "RUNTIME_TARGETS",
    "DEFAULT_MAX_RANK",
    "RuntimeLoraError",
    "RuntimeModule",
    "RuntimeLayout",
    "ConvGeometry",
    "runtime_layout",
    "runtime_factors",
    "pad_factors",
    "lora_branch",
    "active_rows",
    "add_lora_branch",
]

# Module-name suffixes that get a LoRA branch: the attention projections, proj_in / proj_out and
# feed-forward of the transformer blocks (diffusers / PEFT / kohya LoRA targets) and the 3x3 resnet
# convolutions (kohya LoCon). Fixed at export; a LoRA touching a routed module outside these is refused.
RUNTIME_TARGETS: tuple[str, ...] = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
)
DEFAULT_MAX_RANK = 64  # the paper's LoRA rank


class RuntimeLoraError(LoraError):
    """A LoRA (or a network layout) that a runtime-LoRA network cannot take; the message names it."""


@dataclass(frozen=True)
class RuntimeModule:
    """One module with a LoRA branch: its name, layer set and weight shape ``(d_out, d_in[, kh, kw])``."""

    name: str
    kind: str  # "content" (I_c) | "style" (I_s)
    shape: tuple[int, ...]

    @property
    def conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def d_out(self) -> int:
        return int(self.shape[0])

    @property
    def fan_in(self) -> int:
        """Columns of ``A``: ``d_in`` (linear) or ``d_in * kh * kw`` (conv)."""
        return int(math.prod(self.shape[1:]))

    def bank_shapes(self, rank: int, slots: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Shapes of the (A, B) banks, laid out so the branch is two plain batched matmuls."""
        if self.conv:  # delta = B (A cols) on (B, fan_in, HW)
            return (slots, rank, self.fan_in), (slots, self.d_out, rank)
        return (slots, self.fan_in, rank), (slots, rank, self.d_out)  # delta = (x A) B on (B, T, C)

    def to_json(self) -> list:
        return [self.name, self.kind, list(self.shape)]

    @classmethod
    def from_json(cls, entry: Sequence) -> "RuntimeModule":
        name, kind, shape = entry
        return cls(str(name), str(kind), tuple(int(d) for d in shape))


@dataclass(frozen=True)
class RuntimeLayout:
    """Which modules of a UNet carry a runtime LoRA branch, and the rank every factor is padded to."""

    modules: tuple[RuntimeModule, ...]
    max_rank: int

    def __post_init__(self) -> None:
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise RuntimeLoraError(f"max_rank must be a positive integer, got {self.max_rank!r}")
        if not self.modules:
            raise RuntimeLoraError("the runtime layout has no modules (no target matches a routed module)")

    def of_kind(self, kind: str) -> list[RuntimeModule]:
        return [m for m in self.modules if m.kind == kind]

    def slot_floats(self, kind: str) -> int:
        """Numbers in one padded slot of the ``kind`` banks (the cache's unit of memory)."""
        return sum(self.max_rank * (m.fan_in + m.d_out) for m in self.of_kind(kind))

    def to_json(self) -> dict:
        return {"max_rank": self.max_rank, "modules": [m.to_json() for m in self.modules]}

    @classmethod
    def from_json(cls, entry: Mapping) -> "RuntimeLayout":
        return cls(tuple(RuntimeModule.from_json(m) for m in entry["modules"]), int(entry["max_rank"]))


def _matches(module: str, targets: Sequence[str]) -> bool:
    return any(module == t or module.endswith("." + t) for t in targets)


def runtime_layout(shapes: Mapping[str, tuple[int, ...]], routing: Routing, *, max_rank: int = DEFAULT_MAX_RANK,
                   targets: Sequence[str] = RUNTIME_TARGETS) -> RuntimeLayout:
    """The modules of ``shapes`` (UNet module -> weight shape) in I_c or I_s whose names end with a
    target suffix, in name order."""
    modules = []
    for name in sorted(shapes):
        kind = routing.layer_set(name)
        if kind is None or not _matches(name, targets):
            continue
        shape = tuple(int(d) for d in shapes[name])
        if len(shape) not in (2, 4):
            raise RuntimeLoraError(f"runtime target {name!r} has weight shape {shape}: only linear and conv2d "
                                   f"modules take runtime LoRA factors")
        modules.append(RuntimeModule(name, kind, shape))
    return RuntimeLayout(tuple(modules), int(max_rank))


def _refuse(adapter: LoraAdapter, what: str, modules: Sequence[str]) -> RuntimeLoraError:
    return RuntimeLoraError(f"LoRA {adapter.name!r}: {len(modules)} module(s) {what} (e.g. {modules[0]!r}); "
                            f"the runtime network cannot take it: export it with --lora-mode baked")


def runtime_factors(adapter: LoraAdapter, kind: str, routing: Routing,
                    layout: RuntimeLayout) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A (r, fan_in), B (d_out, r))}`` in fp32 for the runtime network, alpha/rank folded into B.

    Factors come out as they went in: torch tensors, or numpy arrays (``craft export`` registering a
    LoRA into a runtime repository reads the file with numpy and never imports torch).

    Only the modules inside the LoRA's own layer set are kept (Eq. 7, as the baked path does).
    Refuses (naming the LoRA, a module and the reason) anything the network cannot take.
    """
    routed = routing.select(kind, adapter.modules)
    not_lora = sorted(m for m in routed if not isinstance(adapter.modules[m], LoraFactors))
    if not_lora:
        kinds = "/".join(sorted({adapter.modules[m].kind for m in not_lora}))
        raise _refuse(adapter, f"are {kinds} adapters, not plain low-rank factors B A", not_lora)
    tucker = sorted(m for m in routed if adapter.modules[m].mid is not None)
    if tucker:
        raise _refuse(adapter, "have a Tucker core (lora_mid)", tucker)
    by_name = {m.name: m for m in layout.modules}
    outside = sorted(m for m in routed if m not in by_name)
    if outside:
        raise _refuse(adapter, f"have no runtime branch (the network's targets end with {list(RUNTIME_TARGETS)})",
                      outside)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in routed:
        f = adapter.modules[name]
        if f.rank > layout.max_rank:
            raise RuntimeLoraError(f"LoRA {adapter.name!r} has rank {f.rank} (module {name!r}), above the runtime "
                                   f"network's max rank {layout.max_rank}; re-export with a larger --max-rank or "
                                   f"bake it (--lora-mode baked)")
        A = _fp32_rows(f.A, f.rank)
        B = _fp32_rows(f.B, f.B.shape[0]) * f.scale
        if A.shape[1] != by_name[name].fan_in or tuple(B.shape) != (by_name[name].d_out, f.rank):
            raise RuntimeLoraError(f"LoRA {adapter.name!r}: module {name!r}: factors A{tuple(f.A.shape)} "
                                   f"B{tuple(f.B.shape)} do not fit weight {by_name[name].shape}")
        if not (_finite(A) and _finite(B)):
            raise RuntimeLoraError(f"LoRA {adapter.name!r}: non-finite factors in module {name!r}")
        out[name] = (A, B)
    return out


def _fp32_rows(t, rows: int):
    """A factor as a contiguous fp32 (rows, -1) matrix of its own kind: torch tensor or numpy array."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t.reshape(rows, -1), dtype=np.float32)
    return t.detach().to(torch.float32).reshape(rows, -1).contiguous()


def _finite(t) -> bool:
    return bool(np.isfinite(t).all()) if isinstance(t, np.ndarray) else bool(torch.isfinite(t).all())


def pad_factors(module: RuntimeModule, A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's factors zero-padded to ``rank`` in its bank layout (one slot, no slot axis)."""
    r = A.shape[0]
    if A.shape != (r, module.fan_in) or B.shape != (module.d_out, r) or r > rank:
        raise RuntimeLoraError(f"factors A{tuple(A.shape)} B{tuple(B.shape)} do not fit module {module.name!r} "
                               f"{module.shape} at rank <= {rank}")
    A_pad = torch.zeros(rank, module.fan_in, dtype=A.dtype)
    B_pad = torch.zeros(module.d_out, rank, dtype=B.dtype)
    A_pad[:r], B_pad[:, :r] = A, B
    if module.conv:
        return A_pad, B_pad  # (R, fan_in), (d_out, R)
    return A_pad.t().contiguous(), B_pad.t().contiguous()  # (fan_in, R), (R, d_out)


@dataclass(frozen=True)
class ConvGeometry:
    """What the conv branch needs of an ``nn.Conv2d``: channels, kernel, stride, zero padding (dilation 1, groups 1)."""

    channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def pointwise(self) -> bool:
        return (*self.kernel, *self.stride, *self.padding) == (1, 1, 1, 1, 0, 0)

    def unfold_kernel(self) -> torch.Tensor:
        """(C*kh*kw, 1, kh, kw) one-hot depthwise kernel: conv2d with it (groups=C) is im2col, columns in
        ``A.reshape(r, C*kh*kw)`` order (one Conv node in the exported graph, no im2col op needed)."""
        kh, kw = self.kernel
        eye = torch.eye(kh * kw, dtype=torch.float32).reshape(kh * kw, 1, kh, kw)
        return eye.repeat(self.channels, 1, 1, 1)


def _im2col(x: torch.Tensor, geom: ConvGeometry, unfold: torch.Tensor | None) -> torch.Tensor:
    """(N, C, H, W) -> (N, C*kh*kw, Ho*Wo)."""
    n = x.shape[0]  # explicit sizes, no -1: n may be 0 (no active sample)
    if geom.pointwise:
        return x.reshape(n, geom.channels, x.shape[2] * x.shape[3])
    if unfold is None:
        unfold = geom.unfold_kernel().to(x.dtype)
    cols = torch.nn.functional.conv2d(x, unfold, stride=geom.stride, padding=geom.padding, groups=geom.channels)
    return cols.reshape(n, unfold.shape[0], cols.shape[2] * cols.shape[3])  # (N, C*kh*kw, Ho, Wo) -> (N, C*kh*kw, HoWo)


def lora_branch(x: torch.Tensor, A_bank: torch.Tensor, B_bank: torch.Tensor, index: torch.Tensor,
                scale: torch.Tensor, geom: ConvGeometry | None, out: torch.Tensor,
                unfold: torch.Tensor | None = None) -> torch.Tensor:
    """``scale[b] * B[index[b]] (A[index[b]] x[b])`` for every sample b (banks from :func:`pad_factors`).

    ``x``: the module's input, (B, T, d_in) or (B, d_in) for a linear module (``geom`` None),
    (B, d_in, H, W) for a conv; ``out``: the module's W_init output (for its shape); ``index``
    (B,) int64 slot per sample; ``scale`` (B, 1, 1) float (shaped once per call by the caller:
    one Reshape per call, not per module, in the graph); ``unfold``: ``geom.unfold_kernel()``, kept
    by the caller (a constant of the exported graph). Returns the delta in ``out``'s shape.
    """
    A = A_bank.index_select(0, index)  # (B, fan_in, R) linear / (B, R, fan_in) conv
    # the gate scales the gathered B (R x d_out per sample), not the (T, R) / (R, HoWo) activations:
    # at serving resolutions T (tokens / pixels) is far larger than d_out
    B = B_bank.index_select(0, index) * scale  # (B, R, d_out) / (B, d_out, R)
    if geom is not None:
        cols = _im2col(x, geom, unfold)  # (B, fan_in, HoWo)
        return torch.matmul(B, torch.matmul(A, cols)).reshape_as(out)  # (B, R, HoWo) -> (B, d_out, Ho, Wo)
    if x.dim() == 2:
        return torch.matmul(torch.matmul(x.unsqueeze(1), A), B).squeeze(1)
    return torch.matmul(torch.matmul(x, A), B)  # (B, T, R) -> (B, T, d_out)


def active_rows(index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(n,) int64: the samples whose branch is not zero (a LoRA in the slot and a non-zero gate), in order.

    Computed once per layer set and call; every branch of that set then runs on these rows only, so
    ACFG's unconditional row (gates 0) and the gated-off layer set of a step cost no LoRA work.

    Never empty: with no active sample, row 0 runs at its own slot and gate (slot 0's zero factors, or
    a gate of 0), which adds exact zeros. An empty batch would make ONNX Runtime's fused Reshapes
    (``{0, C, -1}``) fail on zero elements, and costs one row of work only in a call where the whole
    layer set is off.
    """
    active = (index != 0) & (scale != 0)
    first = torch.arange(index.shape[0], device=index.device) == 0
    return torch.nonzero(active | (first & ~active.any())).reshape(-1)


def add_lora_branch(out: torch.Tensor, x: torch.Tensor, A_bank: torch.Tensor, B_bank: torch.Tensor,
                    rows: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, geom: ConvGeometry | None,
                    unfold: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (the module's W_init output) with the branch of :func:`lora_branch` added to the samples ``rows``.

    ``rows``: :func:`active_rows`; ``index`` / ``scale``: those rows' slots (n,) and gates (n, 1, 1).
    Other samples are ``out`` unchanged, bit for bit (W_init exactly, Eq. 10's unconditional branch).
    """
    out_rows = out.index_select(0, rows)
    delta = lora_branch(x.index_select(0, rows), A_bank, B_bank, index, scale, geom, out_rows, unfold)
    return out.index_put((rows,), out_rows + delta)
