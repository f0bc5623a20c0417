"""Rank-FT layers and their learnable bases (CRAFT-LoRA Eq. 1-4), and the frequency split of its data.

Layers. The Rank-FT layers are the attention projections of every transformer block
(``attn1`` / ``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0``: the modules the LoRAs
adapt), one layer per ``nn.Linear``, numbered l = 1..L in UNet *forward* order (down
blocks, mid block, up blocks; inside a block in module order). Eq. 2 gives layer l the
rank ``r_l = r_max - (l-1)/(L-1) (r_max - r_min)``, capped at the layer's ``d_in``.

Bases. Each layer has a learnable content basis ``B_c`` and style basis ``B_s``
(``d_in x r_l``, init ``N(0, 1/d_in)``); QR with a sign fix gives orthonormal ``Q``
(Eq. 1). The projection acts on the input side: ``W = W0 - W0 Q Q^T``.

Data. Each image is split in frequency with a Gaussian low-pass
``H(f) = exp(-|f|^2 / (2 (sigma f_N)^2))``, where ``|f|`` is the radial frequency in cycles
per pixel and ``f_N = 0.5`` the Nyquist frequency, so ``--sigma`` is the filter's standard
deviation as a fraction of Nyquist (the paper's "normalised cutoff", default 0.35). Content =
low-pass of the content image, style = high-pass residual (image - low-pass) of the style
image, in [-1, 1] pixel units (0 = mid grey). The filter runs in the FFT domain on a
reflect-padded image.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from craft_ops.rankft import merged_basis, orthonormal_basis, projection_residual, rank_schedule

from .config import ATTENTION_SUFFIXES, TrainError

log = logging.getLogger(__name__)

__all__ = ["frequency_split", "LayerSpec", "target_layers", "layer_specs", "RankFTBases"]


def frequency_split(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Content = Gaussian low-pass with std ``sigma * Nyquist``, style = residual (Rank-FT data)."""
    _, _, H, W = x.shape  # (N, C, H, W)
    ph, pw = H // 2, W // 2
    padded = torch.nn.functional.pad(x.float(), (pw, pw, ph, ph), mode="reflect")
    Hp, Wp = padded.shape[-2:]
    fy = torch.fft.fftfreq(Hp).reshape(-1, 1)  # cycles / pixel, Nyquist = 0.5
    fx = torch.fft.rfftfreq(Wp).reshape(1, -1)
    std = sigma * 0.5
    gain = torch.exp(-(fy ** 2 + fx ** 2) / (2.0 * std ** 2))  # (Hp, Wp // 2 + 1)
    low = torch.fft.irfft2(torch.fft.rfft2(padded) * gain, s=(Hp, Wp))[..., ph:ph + H, pw:pw + W]
    return low, x.float() - low


@dataclass(frozen=True)
class LayerSpec:
    """One Rank-FT layer: module name, input dimension and rank r_l (Eq. 2)."""

    name: str
    d_in: int
    r: int


def _forward_key(name: str) -> tuple[int, int]:
    """(stage, block): down blocks, then the mid block, then up blocks."""
    m = re.match(r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?", name)
    if m is None:
        return (3, 0)
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[m[1]]
    return stage, int(m[2] or 0)


def target_layers(unet: nn.Module, suffixes: Sequence[str] = ATTENTION_SUFFIXES) -> list[str]:
    """Names of the targeted ``nn.Linear`` modules in UNet forward order."""
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple(suffixes))]
    return sorted(names, key=_forward_key)  # stable: module order inside a block


def layer_specs(
    unet: nn.Module, r_max: int, r_min: int, suffixes: Sequence[str] = ATTENTION_SUFFIXES
) -> list[LayerSpec]:
    """Rank-FT layers with the hierarchical rank of Eq. 2, capped at ``d_in``."""
    names = target_layers(unet, suffixes)
    if not names:
        raise TrainError(f"the UNet has no modules ending in {list(suffixes)}")
    modules = dict(unet.named_modules())
    ranks = rank_schedule(len(names), r_max, r_min)
    specs = [LayerSpec(n, modules[n].in_features, min(r, modules[n].in_features)) for n, r in zip(names, ranks)]
    covered = [s.name for s in specs if 2 * s.r >= s.d_in]
    if covered:
        log.warning("%d layers have r_c + r_s >= d_in (e.g. %s): the merged subspace can cover their whole "
                    "input space and zero them in W_init; lower --r-max", len(covered), covered[0])
    return specs


class RankFTBases(nn.Module):
    """Learnable content and style bases ``B`` per layer; ``Q = QR(B)`` (Eq. 1, 3)."""

    def __init__(self, layers: Sequence[LayerSpec], generator: torch.Generator):
        super().__init__()
        self.layers = list(layers)
        init = [torch.randn(s.d_in, s.r, generator=generator) / math.sqrt(s.d_in) for s in self.layers for _ in "cs"]
        self.B_c = nn.ParameterList([nn.Parameter(b) for b in init[0::2]])
        self.B_s = nn.ParameterList([nn.Parameter(b) for b in init[1::2]])

    def _bases(self, kind: str) -> nn.ParameterList:
        return {"content": self.B_c, "style": self.B_s}[kind]

    def Q(self, kind: str) -> list[torch.Tensor]:
        """Orthonormal ``Q_l`` (d_in, r_l) of every layer for ``content`` / ``style``."""
        return [orthonormal_basis(B) for B in self._bases(kind)]

    def projected(self, kind: str, W0: Mapping[str, torch.Tensor],
                  Q: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``functional_call`` overrides ``unet.<m>.weight = W0 - W0 Q Q^T`` (Eq. 1).

        ``Q``: the bases of ``kind`` when the caller already has them (else computed here).
        """
        Q = self.Q(kind) if Q is None else Q
        return {f"unet.{s.name}.weight": projection_residual(W0[s.name], q) for s, q in zip(self.layers, Q)}

    def overlap(self, Q_c: Sequence[torch.Tensor] | None = None,
                Q_s: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """``L_orth = mean_l ||Q_c^T Q_s||_F^2 / min(r_c, r_s)`` in [0, 1] (bases computed if not given)."""
        Q_c = self.Q("content") if Q_c is None else Q_c
        Q_s = self.Q("style") if Q_s is None else Q_s
        terms = [(Qc.T @ Qs).pow(2).sum() / min(Qc.shape[1], Qs.shape[1]) for Qc, Qs in zip(Q_c, Q_s)]
        return torch.stack(terms).mean()

    @torch.no_grad()
    def merged(self) -> dict[str, torch.Tensor]:
        """``Q_merged = QR([Q_c | Q_s])`` per layer (Eq. 3-4)."""
        return {s.name: merged_basis(Qc, Qs) for s, Qc, Qs in zip(self.layers, self.Q("content"), self.Q("style"))}

    def raw_state(self) -> dict[str, torch.Tensor]:
        """The learnable ``B`` tensors, keyed ``B_c.<module>`` / ``B_s.<module>``."""
        out = {}
        for prefix, bases in (("B_c", self.B_c), ("B_s", self.B_s)):
            out.update({f"{prefix}.{s.name}": B.detach().cpu().contiguous() for s, B in zip(self.layers, bases)})
        return out

    @torch.no_grad()
    def load_raw_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for prefix, bases in (("B_c", self.B_c), ("B_s", self.B_s)):
            for s, B in zip(self.layers, bases):
                key = f"{prefix}.{s.name}"
                if key not in tensors or tuple(tensors[key].shape) != tuple(B.shape):
                    raise TrainError(f"--resume: checkpoint basis {key!r} is missing or has the wrong shape")
                B.copy_(tensors[key])

    @torch.no_grad()
    def q_state(self) -> dict[str, torch.Tensor]:
        """Orthonormal bases for ``bases.safetensors``: ``Q_c.<module>`` / ``Q_s.<module>``."""
        out = {}
        for prefix, kind in (("Q_c", "content"), ("Q_s", "style")):
            out.update({f"{prefix}.{s.name}": Q.cpu().contiguous() for s, Q in zip(self.layers, self.Q(kind))})
        return out
