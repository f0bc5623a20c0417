"""Routed DreamBooth LoRA training on the W_init backbone (CRAFT-LoRA Eq. 6-8).

A LoRA of kind ``content`` is trained only on modules in the content layer set I_c, a
``style`` LoRA only on I_s (Eq. 7; routing preset = the architecture's unless
``--routing`` names another). The prompt's routing tokens are stripped before text
encoding (Eq. 6): ``"a sks dog <c>"`` trains on ``"a sks dog"``. Objective: the usual
DreamBooth denoising loss (no prior preservation) of the frozen W_init UNet plus the
LoRA deltas ``dW = alpha / rank * B @ A`` on the routed modules, which is the very delta
Eq. 8 adds at serving time. ``B`` starts at zero (training starts from W_init exactly),
``A`` uniform in ``+-1/sqrt(fan_in)`` (PEFT's default) from the seeded generator.

The LoRA layers are forward hooks on the frozen ``nn.Linear`` / ``nn.Conv2d`` modules, so
module names stay the UNet's and the file is written in the diffusers / PEFT layout
``unet.<module>.lora_A.weight`` / ``lora_B.weight`` with ``lora_adapter_metadata``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from craft_ops.gates import parse_prompt
from craft_ops.routing import Routing, resolve_routing
from craft_export.lora_files import adapter_metadata

from .common import (
    NoiseSchedule,
    Progress,
    compute_dtype,
    denoising_loss,
    encode_latents,
    encode_prompt,
    epoch_order,
    frozen_unet,
    load_images,
    training_device,
)
from .config import ATTENTION_SUFFIXES, LoraTrainConfig, TrainError

log = logging.getLogger(__name__)

__all__ = ["LoraTrainConfig", "LoraResult", "LoraLayer", "LoraSet", "lora_targets", "LoraTrainer", "train_lora"]


@dataclass(frozen=True)
class LoraResult:
    out: Path
    kind: str
    modules: tuple[str, ...]
    losses: tuple[float, ...]
    train_seconds: float

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


# -- LoRA layers ------------------------------------------------------------------------------


class LoraLayer(nn.Module):
    """Trainable ``dW = alpha / rank * B @ A`` on a frozen Linear / Conv2d (Eq. 8 delta)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise TrainError(f"grouped convolutions cannot carry a LoRA (groups={base.groups})")
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TrainError(f"LoRA targets must be Linear or Conv2d, got {type(base).__name__}")
        W = base.weight  # (d_out, d_in) or (c_out, c_in, kh, kw)
        # conv geometry as plain values: the frozen base module must not become a submodule
        self.conv = (base.stride, base.padding, base.dilation) if isinstance(base, nn.Conv2d) else None
        self.scale = alpha / rank
        A = torch.empty((rank, *W.shape[1:]), dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(A.to(W.device))  # (r, d_in) or (r, c_in, kh, kw)
        self.B = nn.Parameter(torch.zeros((W.shape[0], rank, *(1,) * (W.ndim - 2)), device=W.device))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * B(A(x))`` in the input's dtype."""
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        if self.conv is None:
            return F.linear(F.linear(x, A), B) * self.scale
        stride, padding, dilation = self.conv
        return F.conv2d(F.conv2d(x, A, None, stride, padding, dilation), B) * self.scale

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.delta(inputs[0])


class LoraSet(nn.Module):
    """The LoRA layers of one adapter, attached to a UNet by forward hooks."""

    def __init__(self, unet: nn.Module, names: Sequence[str], rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        modules = dict(unet.named_modules())
        self.names = list(names)
        self.rank, self.alpha = rank, alpha
        self.layers = nn.ModuleList([LoraLayer(modules[n], rank, alpha, generator) for n in self.names])
        self._targets = [modules[n] for n in self.names]
        self._handles: list = []

    def attach(self) -> "LoraSet":
        self.detach()
        self._handles = [m.register_forward_hook(layer.hook) for m, layer in zip(self._targets, self.layers)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """``unet.<module>.lora_A.weight`` (r, d_in) and ``lora_B.weight`` (d_out, r), fp32."""
        out = {}
        for name, layer in zip(self.names, self.layers):
            out[f"unet.{name}.lora_A.weight"] = layer.A.detach().float().cpu().contiguous()
            out[f"unet.{name}.lora_B.weight"] = layer.B.detach().float().cpu().contiguous()
        return out


def lora_targets(
    unet: nn.Module, routing: Routing, kind: str, suffixes: Sequence[str] = ATTENTION_SUFFIXES
) -> list[str]:
    """Linear / Conv2d modules ending in ``suffixes`` inside the layer set of ``kind`` (Eq. 7)."""
    candidates = [n for n, m in unet.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and n.endswith(tuple(suffixes))]
    names = routing.select(kind, candidates)
    if not names:
        raise TrainError(f"routing {routing.name!r}: no {kind} layer of this UNet ends in {list(suffixes)}")
    return names


# -- trainer -----------------------------------------------------------------------------------


class LoraTrainer:
    """AdamW on the LoRA factors; the UNet stays frozen."""

    def __init__(self, net: nn.Module, lora: LoraSet, latents: torch.Tensor, cond, schedule: NoiseSchedule,
                 config: LoraTrainConfig, dtype: torch.dtype, generator: torch.Generator):
        self.net, self.lora, self.latents, self.cond, self.schedule = net, lora, latents, cond, schedule
        self.config, self.dtype, self.generator = config, dtype, generator
        self.optimizer = torch.optim.AdamW(lora.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step(self, step: int) -> float:
        """One DreamBooth step on a batch of the instance images."""
        B, N = self.config.batch_size, self.latents.shape[0]
        order = [epoch_order(step * B + b, N, self.config.seed) for b in range(B)]
        idx = torch.tensor(order, device=self.latents.device)
        t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=self.generator).to(self.latents.device)
        eps = torch.randn((B, *self.latents.shape[1:]), generator=self.generator).to(self.latents.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = denoising_loss(self.net, None, self.latents[idx], eps, t, self.cond, self.schedule, self.dtype)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"LoRA loss became non-finite at step {step + 1}")
        return value


# -- the whole run -------------------------------------------------------------------------------


def _prepare(config: LoraTrainConfig, device: torch.device, dtype: torch.dtype):
    """Images -> latents, prompt (tokens stripped, Eq. 6) -> conditioning; frozen W_init UNet."""
    from craft_export.loading import load_pipeline_parts
    from craft_export.networks import UNetNet

    pixels = load_images(config.images, config.resolution, "--images")  # fail before loading models
    gates = parse_prompt(config.prompt)
    token = {"content": gates.has_content_token, "style": gates.has_style_token}[config.kind]
    if not token:
        log.warning("--prompt %r has no %s token for a %s LoRA", config.prompt,
                    "<c>" if config.kind == "content" else "<s>", config.kind)
    parts = load_pipeline_parts(config.base, backbone=config.backbone)
    latents = encode_latents(parts.vae.to(device), pixels, device)
    cond = encode_prompt(parts, gates.text, config.resolution, device)
    parts.vae, parts.text_encoders = None, []
    net = UNetNet(frozen_unet(parts.unet, device, dtype))
    return net, latents, cond, NoiseSchedule.from_config(parts.scheduler_config), parts.arch


def save_lora(config: LoraTrainConfig, lora: LoraSet, arch: str, routing: Routing) -> None:
    """PEFT-layout safetensors with the metadata ``load_lora`` and the recipe tools read."""
    from safetensors.torch import save_file

    metadata = {
        "craft.kind": config.kind, "craft.arch": arch, "craft.routing": routing.name,
        "craft.routing_sets": json.dumps(routing.as_dict()), "craft.rank": str(config.rank),
        "craft.prompt": config.prompt, "craft.steps": str(config.steps),
        "craft.backbone": str(config.backbone.resolve()) if config.backbone else "",
        "lora_adapter_metadata": adapter_metadata({n: config.rank for n in lora.names}, config.lora_alpha),
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora.peft_state_dict(), str(config.out), metadata=metadata)


def train_lora(config: LoraTrainConfig, progress: Progress | None = None) -> LoraResult:
    """DreamBooth LoRA restricted to I_c or I_s (Eq. 7), trained on W_init, saved as PEFT safetensors.

    ``progress(done, steps, {"loss": ...})`` runs after every step.
    """
    # 1. data and frozen networks
    device = training_device()
    dtype = compute_dtype(config.mixed_precision, device)
    net, latents, cond, schedule, arch = _prepare(config, device, dtype)
    routing = resolve_routing(config.routing or arch)
    routing.check_against([n for n, _ in net.unet.named_modules() if n])
    # 2. LoRA layers on the routed modules
    generator = torch.Generator("cpu").manual_seed(config.seed)
    names = lora_targets(net.unet, routing, config.kind, config.targets)
    lora = LoraSet(net.unet, names, config.rank, config.lora_alpha, generator).attach()
    log.info("training a %s LoRA on %d modules of %s", config.kind, len(names), routing.name)
    # 3. the loop
    trainer = LoraTrainer(net, lora, latents, cond, schedule, config, dtype, generator)
    losses, t0 = [], time.perf_counter()
    try:
        for step in range(config.steps):
            losses.append(trainer.step(step))
            if progress is not None:
                progress(step + 1, config.steps, {"loss": losses[-1]})
    finally:
        lora.detach()
    seconds = time.perf_counter() - t0
    # 4. the file
    save_lora(config, lora, arch, routing)
    return LoraResult(config.out, config.kind, tuple(names), tuple(losses), seconds)
