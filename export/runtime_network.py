"""The runtime-LoRA UNet: W_init plus a per-sample LoRA branch in every routed target module (see
:mod:`craft_ops.runtime_lora` for the math and what it refuses).

:class:`RuntimeUNetNet` wraps a :class:`~craft_export.networks.UNetNet` and takes, besides the
UNet's own inputs, the slot index and scale of each sample for each layer set and the factor
banks of every module (``R``: the max rank fixed at export; ``S``: slots, dynamic):

=====================  ==============================  ==========================================
input                  shape                           meaning
=====================  ==============================  ==========================================
``content_index``      (B,) INT64                      slot of the sample's content LoRA (0: none)
``content_scale``      (B,) FP32                       gamma_c(t) of the sample (Eq. 9); 0: W_init
``style_index``        (B,) INT64                      slot of the sample's style LoRA
``style_scale``        (B,) FP32                       gamma_s(t)
``lora_A.<i>``         (S, fan_in, R) / (S, R, fan_in)  module i's A bank (linear / conv)
``lora_B.<i>``         (S, R, d_out) / (S, d_out, R)   module i's B bank, alpha/rank folded in
=====================  ==============================  ==========================================

Each layer set's branches run only on the samples with a LoRA and a non-zero gate
(:func:`~craft_ops.runtime_lora.active_rows`, ``compact=True``, the ONNX Runtime graph); ``compact=False``
is the dense graph TensorRT engines are built from. Same inputs, same outputs.

The serving cache *is* these banks (updated in place when a LoRA is loaded), so a call carries
only indices and scales. The branches are attached with forward hooks for the duration of a
forward (export, parity, reference), so the wrapped UNet (shared with the baked exports) is
never modified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from craft_ops.runtime_lora import (ConvGeometry, RuntimeLayout, RuntimeLoraError, active_rows, add_lora_branch,
                                    lora_branch, pad_factors)

from .networks import UNetNet
from .specs import NetworkSpec, TensorSpec

__all__ = ["RUNTIME_INPUTS", "RuntimeUNetNet", "runtime_spec", "bank_names", "make_banks"]

RUNTIME_INPUTS = ("content_index", "content_scale", "style_index", "style_scale")
_UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")


def bank_names(i: int) -> tuple[str, str]:
    return f"lora_A.{i}", f"lora_B.{i}"


def runtime_spec(unet_spec: NetworkSpec, layout: RuntimeLayout) -> NetworkSpec:
    """The runtime network's contract: the UNet's inputs, the per-sample LoRA inputs, the banks."""
    inputs = list(unet_spec.inputs)
    inputs += [TensorSpec("content_index", "INT64", ("B",)), TensorSpec("content_scale", "FP32", ("B",)),
               TensorSpec("style_index", "INT64", ("B",)), TensorSpec("style_scale", "FP32", ("B",))]
    for i, m in enumerate(layout.modules):
        a, b = m.bank_shapes(layout.max_rank, 1)
        name_a, name_b = bank_names(i)
        inputs += [TensorSpec(name_a, "FP32", ("S", *a[1:])), TensorSpec(name_b, "FP32", ("S", *b[1:]))]
    meta = {**unet_spec.meta, "runtime_layout": layout.to_json()}
    return NetworkSpec("unet_lora", unet_spec.arch, tuple(inputs), unet_spec.outputs, max_batch=unet_spec.max_batch,
                       latent_scale=unet_spec.latent_scale, meta=meta)


def _geometry(name: str, module: nn.Module) -> ConvGeometry | None:
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        raise RuntimeLoraError(f"runtime target {name!r} is a {type(module).__name__}, not Linear / Conv2d")
    if (module.groups != 1 or tuple(module.dilation) != (1, 1) or module.padding_mode != "zeros"
            or isinstance(module.padding, str)):
        raise RuntimeLoraError(f"runtime target {name!r}: conv with groups={module.groups}, dilation={module.dilation}, "
                               f"padding={module.padding!r} ({module.padding_mode}) has no runtime LoRA branch")
    return ConvGeometry(int(module.in_channels), tuple(module.kernel_size), tuple(module.stride), tuple(module.padding))


class RuntimeUNetNet(nn.Module):
    """``eps = UNet_{W_init + per-sample LoRA branches}(...)`` for a :func:`runtime_spec` contract."""

    def __init__(self, unet_net: UNetNet, spec: NetworkSpec, *, compact: bool = True):
        super().__init__()
        # compact: each layer set's branches run only on the samples with a LoRA and a non-zero gate
        # (one NonZero per set and call, then Gather / ScatterND per module): ACFG's unconditional row and a
        # gated-off set cost nothing. Data-dependent shapes; False gives the dense graph (every sample
        # through every branch, gates as multipliers) for builders that want static shapes (TensorRT).
        self.compact = bool(compact)
        self.net = unet_net
        self.layout = RuntimeLayout.from_json(spec.meta["runtime_layout"])
        self.input_names = spec.input_names
        layout = self.layout
        modules = dict(unet_net.unet.named_modules())
        missing = [m.name for m in layout.modules if m.name not in modules]
        if missing:
            raise RuntimeLoraError(f"runtime layout names modules the UNet does not have: {missing[:3]}")
        self._targets = [modules[m.name] for m in layout.modules]
        self._geoms = [_geometry(m.name, modules[m.name]) for m in layout.modules]
        for m, mod in zip(layout.modules, self._targets):
            if tuple(mod.weight.shape) != m.shape:
                raise RuntimeLoraError(f"runtime layout: module {m.name!r} has weight {tuple(mod.weight.shape)}, "
                                       f"layout says {m.shape}")
        # im2col kernels of the k x k convs: constants of the exported graph (buffers, not saved in a state dict)
        for i, g in enumerate(self._geoms):
            if g is not None and not g.pointwise:
                self.register_buffer(f"unfold_{i}", g.unfold_kernel(), persistent=False)
        self._ctx: dict | None = None

    @contextlib.contextmanager
    def _attached(self) -> Iterator[None]:
        hooks = [mod.register_forward_hook(self._hook(i)) for i, mod in enumerate(self._targets)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def _hook(self, i: int):
        kind, geom = self.layout.modules[i].kind, self._geoms[i]

        def hook(_mod, args, output):
            ctx = self._ctx
            A, B = ctx["banks"][i]
            unfold = getattr(self, f"unfold_{i}", None)
            if self.compact:
                rows, index, scale = ctx[kind]
                return add_lora_branch(output, args[0], A, B, rows, index, scale, geom, unfold)
            index, scale = ctx[kind]
            return output + lora_branch(args[0], A, B, index, scale, geom, output, unfold)

        return hook

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """Inputs positionally in :attr:`input_names` order (the ONNX export) or by keyword."""
        values = {**dict(zip(self.input_names, args)), **kwargs}
        n = len(self.layout.modules)
        self._ctx = {"banks": [(values[bank_names(i)[0]], values[bank_names(i)[1]]) for i in range(n)]}
        for kind in ("content", "style"):  # per layer set and call, not per module
            index, scale = values[f"{kind}_index"], values[f"{kind}_scale"]
            if self.compact:
                rows = active_rows(index, scale)
                self._ctx[kind] = (rows, index.index_select(0, rows), scale.index_select(0, rows).reshape(-1, 1, 1))
            else:
                self._ctx[kind] = (index, scale.reshape(-1, 1, 1))
        try:
            with self._attached():
                return self.net(*(values.get(k) for k in _UNET_INPUTS))
        finally:
            self._ctx = None


def make_banks(layout: RuntimeLayout, slots: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
               n_slots: int) -> dict[str, torch.Tensor]:
    """Banks with the given LoRAs' factors in their slots (``{slot: {module: (A, B)}}``), zeros elsewhere."""
    out = {}
    for i, m in enumerate(layout.modules):
        a_shape, b_shape = m.bank_shapes(layout.max_rank, n_slots)
        A, B = torch.zeros(a_shape), torch.zeros(b_shape)
        for slot, per_module in slots.items():
            if m.name in per_module:
                A[slot], B[slot] = pad_factors(m, *per_module[m.name], layout.max_rank)
        name_a, name_b = bank_names(i)
        out[name_a], out[name_b] = A, B
    return out
