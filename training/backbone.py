"""Rank-FT: train the rank-constrained W_init backbone (CRAFT-LoRA Eq. 1-4).

Layers. The Rank-FT layers are the attention projections of every transformer block
(``attn1`` / ``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0``: the modules the LoRAs
adapt), one layer per ``nn.Linear``, numbered l = 1..L in UNet *forward* order (down
blocks, mid block, up blocks; inside a block in module order). Eq. 2 gives layer l the
rank ``r_l = r_max - (l-1)/(L-1) (r_max - r_min)``, capped at the layer's ``d_in``.

Bases. Each layer has a learnable content basis ``B_c`` and style basis ``B_s``
(``d_in x r_l``, init ``N(0, 1/d_in)``); QR with a sign fix gives orthonormal ``Q``
(Eq. 1). The projection acts on the input side: ``W = W0 - W0 Q Q^T``.

Data. Every content image x every style image is a pair. Each image is split in
frequency with a Gaussian low-pass ``H(f) = exp(-|f|^2 / (2 (sigma f_N)^2))``, where
``|f|`` is the radial frequency in cycles per pixel and ``f_N = 0.5`` the Nyquist
frequency, so ``--sigma`` is the filter's standard deviation as a fraction of Nyquist
(the paper's "normalised cutoff", default 0.35). Content = low-pass of the content image,
style = high-pass residual (image - low-pass) of the style image, in [-1, 1] pixel units
(0 = mid grey). The filter runs in the FFT domain on a reflect-padded image.

Objective (the paper leaves it unspecified; the reference multiplies a placeholder by 0):

    L = L_c + L_s + lambda_orth * L_orth
    L_c    = E || eps - eps_theta(x_t(low(c_i)),  t, e_0; W0 - W0 Q_c Q_c^T) ||^2
    L_s    = E || eps - eps_theta(x_t(high(s_j)), t, e_0; W0 - W0 Q_s Q_s^T) ||^2
    L_orth = mean_l || Q_c,l^T Q_s,l ||_F^2 / min(r_c,l, r_s,l)

The frozen UNet, conditioned on the empty prompt ``e_0`` (no captions exist for the
references), denoises the content band through weights projected with the content bases
and the style band through weights projected with the style bases. The two members of a
pair (i, j) share the noise ``eps`` and timestep ``t``, so the two terms differ only in the
band and the basis. Only the bases receive gradients (UNet ``requires_grad=False``).

Rationale: the projection removes r_l input directions from each layer. Minimising the
denoising loss through the projected weights makes the bases settle on the directions the
backbone needs *least* to model the content structure (resp. the style texture) of the
references, so W_init keeps its denoising competence on exactly that data while a subspace
of each layer is freed. LoRAs trained on W_init can then write into directions the backbone
no longer uses instead of competing with what it already encodes. ``L_orth`` keeps the
content and style subspaces apart, so the merged subspace has rank ``r_c + r_s`` and the two
kinds of LoRA get separate free directions (without it both bases drift to the same
low-energy directions). W_init is then Eq. 1 with ``Q_merged = QR([Q_c | Q_s])`` (Eq. 3-4).
Optimiser: AdamW, weight decay 0 (``Q`` does not depend on the scale of ``B``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from craft_ops.rankft import merged_basis, orthonormal_basis, projection_residual, rank_schedule

from craft_export.loading import unet_weights
from .common import (
    ATTENTION_SUFFIXES,
    NoiseSchedule,
    TrainError,
    check_positive,
    check_resolution,
    compute_dtype,
    denoising_loss,
    encode_latents,
    encode_prompt,
    epoch_order,
    frozen_unet,
    list_images,
    load_image,
    progress,
    training_device,
)

log = logging.getLogger(__name__)

__all__ = [
    "BackboneConfig",
    "BackboneResult",
    "LayerSpec",
    "RankFTBases",
    "RankFTData",
    "RankFTTrainer",
    "frequency_split",
    "target_layers",
    "layer_specs",
    "train_backbone",
]

_CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class BackboneConfig:
    """Settings of one Rank-FT run (``craft train-backbone``), validated once."""

    base: Path
    content_images: Path
    style_images: Path
    out: Path
    r_max: int = 128
    r_min: int = 4
    steps: int = 500
    lr: float = 1e-3
    resolution: int = 512
    sigma: float = 0.35
    batch_size: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 100  # 0: only at the end
    resume: bool = False
    lambda_orth: float = 0.1
    eval_pairs: int = 4
    eval_timesteps: int = 4
    evaluate: bool = True
    targets: tuple[str, ...] = ATTENTION_SUFFIXES

    def __post_init__(self) -> None:
        for name in ("base", "content_images", "style_images", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        check_positive(self.r_max, "--r-max")
        check_positive(self.r_min, "--r-min")
        if self.r_min > self.r_max:
            raise TrainError(f"--r-min ({self.r_min}) must not exceed --r-max ({self.r_max})")
        check_positive(self.steps, "--steps")
        check_positive(self.lr, "--lr", integer=False)
        check_resolution(self.resolution)
        check_positive(self.sigma, "--sigma", integer=False)
        check_positive(self.batch_size, "--batch-size")
        every = self.checkpoint_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise TrainError(f"--checkpoint-every must be an integer >= 0, got {self.checkpoint_every!r}")
        if not math.isfinite(self.lambda_orth) or self.lambda_orth < 0:
            raise TrainError(f"lambda_orth must be a finite number >= 0, got {self.lambda_orth!r}")
        check_positive(self.eval_pairs, "eval_pairs")
        check_positive(self.eval_timesteps, "eval_timesteps")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BackboneConfig":
        return cls(
            base=args.base, content_images=args.content_images, style_images=args.style_images, out=args.out,
            r_max=args.r_max, r_min=args.r_min, steps=args.steps, lr=args.lr, resolution=args.resolution,
            sigma=args.sigma, batch_size=args.batch_size, mixed_precision=args.mixed_precision, seed=args.seed,
            checkpoint_every=args.checkpoint_every, resume=args.resume,
        )

    def fingerprint(self) -> dict:
        """The settings a checkpoint must share with a run that resumes it."""
        skip = {"out", "steps", "checkpoint_every", "resume", "evaluate"}
        data = {k: v for k, v in asdict(self).items() if k not in skip}
        return json.loads(json.dumps(data, default=lambda v: str(Path(v).resolve())))


@dataclass(frozen=True)
class BackboneResult:
    out: Path
    steps: int
    steps_run: int
    train_seconds: float
    eval_start: float
    eval_end: float


# -- data: frequency split ----------------------------------------------------------------------


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


# -- layers and bases --------------------------------------------------------------------------


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


# -- trainer -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankFTData:
    """Pre-encoded training data: latents of the two bands and the empty-prompt conditioning."""

    content: torch.Tensor  # (N_c, 4, h, w) latents of low-pass content images
    style: torch.Tensor  # (N_s, 4, h, w) latents of high-pass style residuals
    cond: Mapping[str, torch.Tensor]  # batch-1 UNet conditioning of the empty prompt

    @property
    def num_pairs(self) -> int:
        return self.content.shape[0] * self.style.shape[0]

    def pair(self, p: int) -> tuple[int, int]:
        """Pair index -> (content image i, style image j)."""
        return divmod(p, self.style.shape[0])


class RankFTTrainer:
    """AdamW on the bases only; one :meth:`step` = ``L_c + L_s + lambda_orth L_orth``."""

    def __init__(self, net: nn.Module, bases: RankFTBases, data: RankFTData, schedule: NoiseSchedule,
                 config: BackboneConfig, dtype: torch.dtype, generator: torch.Generator):
        self.net, self.bases, self.data, self.schedule = net, bases, data, schedule
        self.config, self.dtype, self.generator = config, dtype, generator
        self.device = data.content.device
        weights = unet_weights(net.unet)
        self.W0 = {s.name: weights[s.name] for s in bases.layers}
        self.optimizer = torch.optim.AdamW(bases.parameters(), lr=config.lr, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs (epoch-wise permutation), timesteps and noise of a 0-based step."""
        B = self.config.batch_size
        pairs = [self.data.pair(epoch_order(step * B + b, self.data.num_pairs, self.config.seed)) for b in range(B)]
        ci = torch.tensor([i for i, _ in pairs], device=self.device)
        sj = torch.tensor([j for _, j in pairs], device=self.device)
        t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=self.generator)
        eps = torch.randn((B, *self.data.content.shape[1:]), generator=self.generator)  # (B, 4, h, w)
        return ci, sj, t.to(self.device), eps.to(self.device)

    def step(self, step: int) -> dict[str, float]:
        """One optimiser step; backward per term so only one UNet graph is alive at a time.

        The bases ``Q = QR(B)`` are computed once per step and shared by both UNet passes and
        ``L_orth``; their (small) graph is kept across the backward passes, each UNet graph is
        freed with its loss.
        """
        ci, sj, t, eps = self._batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        Q = {kind: self.bases.Q(kind) for kind in ("content", "style")}
        losses = {}
        for kind, x0 in (("content", self.data.content[ci]), ("style", self.data.style[sj])):
            loss = denoising_loss(self.net, self.bases.projected(kind, self.W0, Q[kind]), x0, eps, t,
                                  self.data.cond, self.schedule, self.dtype)
            self.scaler.scale(loss).backward(retain_graph=True)
            losses[f"loss_{kind}"] = loss.item()
            del loss
        orth = self.bases.overlap(Q["content"], Q["style"])
        if self.config.lambda_orth > 0:
            self.scaler.scale(self.config.lambda_orth * orth).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        losses["loss_orth"] = orth.item()
        losses["loss"] = losses["loss_content"] + losses["loss_style"] + self.config.lambda_orth * losses["loss_orth"]
        if not math.isfinite(losses["loss"]):
            raise FloatingPointError(f"Rank-FT loss became non-finite at step {step + 1}: {losses}")
        return losses

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fixed pairs x fixed timesteps x fixed noise, the same for a seed."""
        g = torch.Generator("cpu").manual_seed(self.config.seed + 0x5EED)
        n_pairs = min(self.config.eval_pairs, self.data.num_pairs)
        pairs = [self.data.pair(int(p)) for p in torch.randperm(self.data.num_pairs, generator=g)[:n_pairs]]
        T, n_t = self.schedule.num_timesteps, self.config.eval_timesteps
        ts = [int((k + 0.5) / n_t * T) for k in range(n_t)]
        ci = torch.tensor([i for i, _ in pairs for _ in ts], device=self.device)
        sj = torch.tensor([j for _, j in pairs for _ in ts], device=self.device)
        t = torch.tensor(ts * n_pairs, device=self.device)
        eps = torch.randn((len(t), *self.data.content.shape[1:]), generator=g).to(self.device)
        return ci, sj, t, eps

    @torch.no_grad()
    def evaluate(self, *, base: bool = False) -> dict[str, float]:
        """Fixed-noise, fixed-timestep ``L_c``, ``L_s`` (``base``: with W0, no projection)."""
        ci, sj, t, eps = self.eval_set()
        out = {}
        for kind, x0 in (("content", self.data.content[ci]), ("style", self.data.style[sj])):
            params = None if base else self.bases.projected(kind, self.W0)
            chunk = max(self.config.batch_size, 4)
            total = sum(denoising_loss(self.net, params, x0[k:k + chunk], eps[k:k + chunk], t[k:k + chunk],
                                       self.data.cond, self.schedule, self.dtype).item() * len(t[k:k + chunk])
                        for k in range(0, len(t), chunk))
            out[kind] = total / len(t)
        out["total"] = out["content"] + out["style"]
        return out


# -- checkpoints ------------------------------------------------------------------------------


def save_checkpoint(out: Path, trainer: RankFTTrainer, step: int, record: Mapping) -> None:
    """``OUT/checkpoint/``: bases, optimizer + scaler state, RNG states, step and log (atomic)."""
    from safetensors.torch import save_file

    tmp, final = out / f"{_CHECKPOINT}.tmp", out / _CHECKPOINT
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainer.bases.raw_state(), str(tmp / "bases.safetensors"))
    optimizer = {"optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict()}
    torch.save(optimizer, tmp / "optimizer.pt")
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng = {"generator": trainer.generator.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}
    torch.save(rng, tmp / "rng.pt")
    state = {"step": step, "fingerprint": trainer.config.fingerprint(), "record": record}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_checkpoint(out: Path, trainer: RankFTTrainer) -> tuple[int, dict] | None:
    """Restore a trainer from ``OUT/checkpoint``; ``None`` when there is none."""
    from safetensors.torch import load_file

    folder = out / _CHECKPOINT
    if not (folder / "state.json").is_file():
        return None
    try:
        state = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "bases.safetensors"))
        opt = torch.load(folder / "optimizer.pt", weights_only=True)
        rng = torch.load(folder / "rng.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TrainError(f"--resume: cannot read checkpoint {folder}: {exc}") from exc
    _check_fingerprint(folder, state.get("fingerprint", {}), trainer.config.fingerprint())
    trainer.bases.load_raw_state({k: v.to(trainer.device) for k, v in tensors.items()})
    trainer.optimizer.load_state_dict(opt["optimizer"])
    trainer.scaler.load_state_dict(opt["scaler"])
    trainer.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"]), state["record"]


def _check_fingerprint(folder: Path, saved: Mapping, current: Mapping) -> None:
    diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
             if saved.get(k) != current.get(k)]
    if diffs:
        raise TrainError(f"--resume: checkpoint {folder} was written with other settings ({'; '.join(diffs)})")


# -- the whole run --------------------------------------------------------------------------------


def prepare(config: BackboneConfig, device: torch.device, dtype: torch.dtype):
    """Images -> frequency bands -> latents; returns (UNetNet in ``dtype``, data, schedule, arch, files)."""
    from craft_export.loading import load_pipeline_parts
    from craft_export.networks import UNetNet

    # 1. images first: bad folders fail before any model is loaded
    files = {flag: list_images(path, flag) for flag, path in
             (("--content-images", config.content_images), ("--style-images", config.style_images))}
    pixels = {flag: torch.stack([load_image(p, config.resolution) for p in fs]) for flag, fs in files.items()}
    # 2. models, in fp32 for the one-time encodings
    parts = load_pipeline_parts(config.base)
    low, _ = frequency_split(pixels["--content-images"], config.sigma)
    _, high = frequency_split(pixels["--style-images"], config.sigma)
    vae = parts.vae.to(device)
    content, style = encode_latents(vae, low, device), encode_latents(vae, high, device)
    cond = encode_prompt(parts, "", config.resolution, device)
    # 3. frozen UNet in the compute dtype; encoders are no longer needed
    parts.vae, parts.text_encoders = None, []
    net = UNetNet(frozen_unet(parts.unet, device, dtype))
    schedule = NoiseSchedule.from_config(parts.scheduler_config)
    names = {flag: [p.name for p in fs] for flag, fs in files.items()}
    return net, RankFTData(content, style, cond), schedule, parts.arch, names


def write_outputs(config: BackboneConfig, bases: RankFTBases, record: Mapping) -> None:
    """``OUT/unet`` (W_init, Eq. 1 with Q_merged), ``OUT/bases.safetensors``, ``OUT/train_log.json``."""
    from safetensors.torch import save_file

    from craft_export.loading import load_unet

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    layers = [[s.name, s.d_in, s.r] for s in bases.layers]
    metadata = {"craft.rankft": json.dumps(config.fingerprint()), "craft.layers": json.dumps(layers),
                "craft.convention": "W = W0 - W0 Q Q^T (input side); Q_merged = QR([Q_c | Q_s])"}
    save_file(bases.q_state(), str(out / "bases.safetensors"), metadata=metadata)
    unet = load_unet(config.base)  # fp32 W0 from disk, whatever the training precision
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, Q_merged in bases.merged().items():
            W = modules[name].weight
            W_init = projection_residual(W, Q_merged.to(W.device))
            if not torch.isfinite(W_init).all():
                raise FloatingPointError(f"W_init of layer {name!r} is not finite")
            W.copy_(W_init)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps(record, indent=1))


def _new_record(config: BackboneConfig, arch: str, layers: Sequence[LayerSpec], files: Mapping) -> dict:
    return {"arch": arch, "config": config.fingerprint(), "images": files,
            "layers": [asdict(s) for s in layers], "objective": "L_c + L_s + lambda_orth * L_orth",
            "eval": {}, "steps": []}


def train_backbone(config: BackboneConfig) -> BackboneResult:
    """Rank-FT end to end (Eq. 1-4): data, bases, AdamW loop with checkpoints, W_init export."""
    device = training_device()
    dtype = compute_dtype(config.mixed_precision, device)
    net, data, schedule, arch, files = prepare(config, device, dtype)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    layers = layer_specs(net.unet, config.r_max, config.r_min, config.targets)
    bases = RankFTBases(layers, generator).to(device)
    trainer = RankFTTrainer(net, bases, data, schedule, config, dtype, generator)
    start, record = 0, _new_record(config, arch, layers, files)
    if config.resume:
        restored = load_checkpoint(config.out, trainer)
        if restored is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", config.out / _CHECKPOINT)
        else:
            start, record = restored
            log.info("resuming from step %d", start)
    if config.evaluate and "start" not in record["eval"]:
        record["eval"] = {"base_W0": trainer.evaluate(base=True), "start": trainer.evaluate()}
    seconds = _train_loop(trainer, start, record)
    if config.evaluate:
        record["eval"]["end"] = trainer.evaluate()
    write_outputs(config, bases, record)
    ev = record["eval"]
    return BackboneResult(config.out, config.steps, max(config.steps - start, 0), seconds,
                          ev.get("start", {}).get("total", math.nan), ev.get("end", {}).get("total", math.nan))


def _train_loop(trainer: RankFTTrainer, start: int, record: dict) -> float:
    """Steps ``start .. steps-1`` with a progress bar and periodic checkpoints; returns seconds."""
    config = trainer.config
    t0 = time.perf_counter()
    with progress(config.steps, min(start, config.steps), "rank-ft") as bar:
        for step in range(start, config.steps):
            losses = trainer.step(step)
            record["steps"].append({"step": step + 1, **losses})
            bar.set_postfix(loss=f"{losses['loss']:.4f}")
            bar.update(1)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                save_checkpoint(config.out, trainer, step + 1, record)
    seconds = time.perf_counter() - t0
    if start < config.steps or not (config.out / _CHECKPOINT).exists():
        save_checkpoint(config.out, trainer, max(start, config.steps), record)
    return seconds
