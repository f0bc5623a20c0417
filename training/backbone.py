"""Rank-FT: train the rank-constrained W_init backbone (CRAFT-LoRA Eq. 1-4).

Layers, bases and the frequency split are in :mod:`.rankft_bases`. Every content image x every
style image is a pair.

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

``objective = "preserve"`` replaces each band's denoising target by W0's own prediction,
``L_c = E || eps_theta(.; W0) - eps_theta(.; W0 - W0 Q_c Q_c^T) ||^2`` (same for ``L_s``): the
bases then settle on the directions whose removal changes the network least on the references.
Measured on the toy world (tuning seeds, 12 samples per base prompt): ``denoise`` lowers the
reference loss 4x, i.e. the projection acts as a fine-tune toward the references, and the bare
W_init forgets base prompts (0/12 triangles, colours lost) while LoRAs trained on it do better
on the held-out concepts; ``preserve`` keeps W_init close to W0 (12/12 triangles) but gives the
LoRAs nothing. ``denoise`` stays the default (it is what the benchmark's CRAFT row uses).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from craft_export.loading import unet_weights
from craft_ops.rankft import projection_residual

from .common import (
    NoiseSchedule,
    Progress,
    compute_dtype,
    denoising_loss,
    prediction,
    encode_latents,
    encode_prompt,
    epoch_order,
    frozen_unet,
    list_images,
    load_image,
    training_device,
)
from .config import BackboneConfig, TrainError
from .rankft_bases import LayerSpec, RankFTBases, frequency_split, layer_specs

log = logging.getLogger(__name__)

_CHECKPOINT = "checkpoint"

__all__ = [
    "BackboneConfig",
    "BackboneResult",
    "RankFTData",
    "RankFTTrainer",
    "train_backbone",
]


@dataclass(frozen=True)
class BackboneResult:
    out: Path
    steps: int
    steps_run: int
    train_seconds: float
    eval_start: float
    eval_end: float


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
            loss = self._loss(self.bases.projected(kind, self.W0, Q[kind]), x0, eps, t)
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

    def _loss(self, params: Mapping[str, torch.Tensor] | None, x0: torch.Tensor, eps: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
        """The band's term: change of the prediction against W0 (``preserve``) or denoising loss (``denoise``)."""
        if self.config.objective == "denoise":
            return denoising_loss(self.net, params, x0, eps, t, self.data.cond, self.schedule, self.dtype)
        with torch.no_grad():
            target = prediction(self.net, None, x0, eps, t, self.data.cond, self.schedule, self.dtype)
        pred = prediction(self.net, params, x0, eps, t, self.data.cond, self.schedule, self.dtype)
        return F.mse_loss(pred.float(), target.float())

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
            total = sum(self._loss(params, x0[k:k + chunk], eps[k:k + chunk], t[k:k + chunk]).item()
                        * len(t[k:k + chunk]) for k in range(0, len(t), chunk))
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


def train_backbone(config: BackboneConfig, progress: Progress | None = None) -> BackboneResult:
    """Rank-FT end to end (Eq. 1-4): data, bases, AdamW loop with checkpoints, W_init export.

    ``progress(done, steps, losses)`` runs after every step (done counts from a resumed step on).
    """
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
    seconds = _train_loop(trainer, start, record, progress)
    if config.evaluate:
        record["eval"]["end"] = trainer.evaluate()
    write_outputs(config, bases, record)
    ev = record["eval"]
    return BackboneResult(config.out, config.steps, max(config.steps - start, 0), seconds,
                          ev.get("start", {}).get("total", math.nan), ev.get("end", {}).get("total", math.nan))


def _train_loop(trainer: RankFTTrainer, start: int, record: dict, progress: Progress | None) -> float:
    """Steps ``start .. steps-1`` with periodic checkpoints; returns seconds."""
    config = trainer.config
    t0 = time.perf_counter()
    for step in range(start, config.steps):
        losses = trainer.step(step)
        record["steps"].append({"step": step + 1, **losses})
        if progress is not None:
            progress(step + 1, config.steps, losses)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(config.out, trainer, step + 1, record)
    seconds = time.perf_counter() - t0
    if start < config.steps or not (config.out / _CHECKPOINT).exists():
        save_checkpoint(config.out, trainer, max(start, config.steps), record)
    return seconds
