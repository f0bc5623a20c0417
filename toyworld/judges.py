"""Two judges - a shape CNN and a style CNN - that stand in for the paper's CLIP-I scores.

They are trained on the renderer's ground truth over *all* shapes and styles (held-out ones
included), never on model outputs. So that they judge the slightly blurry, slightly off-colour
images of a small diffusion model fairly, training images go through random degradations
(:func:`degrade`): for half of them a darker object on a tinted background, then a Gaussian blur
(sigma up to 1.5 px), pixel noise, a random channel permutation and per-channel gain (colour is
neither a shape nor a style); 1 in 8 stay exactly as rendered. When a VAE is given, its
encode-decode round trip of half of the pool joins the pool (the decoder's own artefacts).

Scores (per image): content score = the shape judge's probability of the target shape,
style score = the style judge's probability of the target style; the CLIP-I analogue is the
cosine similarity of a judge's penultimate features (128-d, after global pooling) to the
mean feature of the LoRA's training images.

Architecture: four stride-2 3x3 convolutions (24, 48, 96, 128 channels) with batch norm and
ReLU, one more 3x3 convolution, global average pooling, a linear classifier (about 0.27 M
parameters per judge).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .world import BACKGROUND, SHAPES, STYLES, WorldError, render, sample_scene

log = logging.getLogger(__name__)

__all__ = ["JudgeNet", "Judges", "Verdict", "JudgeTrainConfig", "train_judges", "degrade", "to_input", "load_folder"]


class JudgeNet(nn.Module):
    """Image (B, 3, 64, 64) in [-1, 1] -> logits (B, classes); :meth:`features` is the penultimate layer."""

    def __init__(self, classes: int, width: Sequence[int] = (24, 48, 96, 128)):
        super().__init__()
        layers, c_in = [], 3
        for c in width:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_folder(folder: Path, field: str = "images") -> tuple[list[Path], np.ndarray]:
    """The PNG / JPEG files of ``folder`` (name order) and their pixels (N, 64, 64, 3) uint8, resized if needed."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise WorldError(f"{field}: folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise WorldError(f"{field}: no PNG/JPEG images in {folder}")
    images = []
    for p in files:
        with Image.open(p) as img:
            img = img.convert("RGB")
            if img.size != (64, 64):
                img = img.resize((64, 64), Image.Resampling.BICUBIC)
            images.append(np.asarray(img))
    return files, np.stack(images)


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float32 in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise WorldError(f"images: expected (N, H, W, 3) uint8, got {tuple(images.shape)} {images.dtype}")
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass(frozen=True)
class Verdict:
    """The judges' outputs for a batch of images."""

    shape_probs: torch.Tensor  # (N, len(SHAPES))
    style_probs: torch.Tensor  # (N, len(STYLES))
    shape_features: torch.Tensor  # (N, 128)
    style_features: torch.Tensor  # (N, 128)

    def shape(self, i: int) -> str:
        return SHAPES[int(self.shape_probs[i].argmax())]

    def style(self, i: int) -> str:
        return STYLES[int(self.style_probs[i].argmax())]

    def records(self) -> list[dict]:
        """One dict per image: predicted shape / style with their probabilities."""
        out = []
        for i in range(self.shape_probs.shape[0]):
            out.append({"shape": self.shape(i), "shape_prob": round(float(self.shape_probs[i].max()), 4),
                        "style": self.style(i), "style_prob": round(float(self.style_probs[i].max()), 4)})
        return out


class Judges:
    """The shape and style judges, loaded from / saved to one safetensors file."""

    def __init__(self, shape: JudgeNet, style: JudgeNet):
        self.shape_net, self.style_net = shape.eval(), style.eval()

    @classmethod
    def fresh(cls, seed: int) -> "Judges":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(JudgeNet(len(SHAPES)), JudgeNet(len(STYLES)))

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        tensors = {f"shape.{k}": v.contiguous() for k, v in self.shape_net.state_dict().items()}
        tensors.update({f"style.{k}": v.contiguous() for k, v in self.style_net.state_dict().items()})
        meta = {"shapes": json.dumps(SHAPES), "styles": json.dumps(STYLES)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "Judges":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise WorldError(f"judges: weights file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if json.loads(meta.get("shapes", "[]")) != list(SHAPES) or json.loads(meta.get("styles", "[]")) != list(STYLES):
            raise WorldError(f"judges: {path} was trained for other shapes/styles ({meta})")
        judges = cls(JudgeNet(len(SHAPES)), JudgeNet(len(STYLES)))
        for prefix, net in (("shape.", judges.shape_net), ("style.", judges.style_net)):
            net.load_state_dict({k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)})
        return judges

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor, chunk: int = 256) -> Verdict:
        """Judge (N, 64, 64, 3) uint8 images."""
        x = to_input(images)
        parts = []
        for k in range(0, x.shape[0], chunk):
            xs = x[k:k + chunk]
            fs, ft = self.shape_net.features(xs), self.style_net.features(xs)
            parts.append((self.shape_net.head(fs).softmax(-1), self.style_net.head(ft).softmax(-1), fs, ft))
        return Verdict(*(torch.cat([p[i] for p in parts]) for i in range(4)))


# -- degradations -------------------------------------------------------------------------------------


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Gaussian blur of each image of (B, C, H, W) ``x`` with its own ``sigma`` (B,); sigma < 0.05: unchanged."""
    b, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma.clamp(min=0.05).view(b, 1)
    k = torch.exp(-offsets.view(1, -1) ** 2 / (2 * s ** 2))
    k = torch.where((sigma < 0.05).view(b, 1), (offsets == 0).float().view(1, -1), k)
    k = (k / k.sum(-1, keepdim=True)).to(x.dtype).repeat_interleave(c, 0)  # (B*C, 2r+1)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


_BG = 2 * torch.tensor(BACKGROUND).view(1, 3, 1, 1) - 1  # the renderer's background in [-1, 1]


def degrade(x: torch.Tensor, g: torch.Generator, *, p_dark: float = 0.5, p_clean: float = 0.125) -> torch.Tensor:
    """Random object darkening and background tint, blur, channel permutation and gain, and noise.

    ``x``: (B, 3, H, W) ground-truth renders in [-1, 1]. Small diffusion models draw objects
    darker than the data and tint the background; neither is a shape or a style. Each image is
    darkened and tinted with probability ``p_dark``, and left exactly as rendered with
    probability ``p_clean`` (the judges must stay sure on clean renders too: with every image
    darkened they lost about 2 points of style accuracy on them).
    """
    b = x.shape[0]
    u = lambda *shape: torch.rand((b, *shape), generator=g)  # noqa: E731
    obj = ((x - _BG).abs().amax(1, keepdim=True) > 0.02).float()  # (B, 1, H, W) the object
    dark = torch.where(u() < p_dark, 0.35 + 0.65 * u(), torch.ones(b)).view(b, 1, 1, 1)
    tint = 0.16 * (u(3) - 0.5) * (dark < 1).float().view(b, 1)
    y = obj * ((x + 1) * dark - 1) + (1 - obj) * (x + tint.view(b, 3, 1, 1))
    y = _blur(y, u() * 1.5)
    perm = u(3).argsort(dim=1)  # a random channel permutation per image
    y = torch.gather(y, 1, perm.view(b, 3, 1, 1).expand_as(y))
    gain = 1.0 + 0.15 * (2 * u(3) - 1)
    y = (y + 1) * gain.view(b, 3, 1, 1) - 1
    y = y + torch.randn(y.shape, generator=g) * (u() * 0.12).view(b, 1, 1, 1)
    clean = (u() < p_clean).view(b, 1, 1, 1)
    return torch.where(clean, x, y.clamp(-1, 1))


# -- training --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeTrainConfig:
    """``p_dark`` / ``p_clean``: see :func:`degrade`; ``check_every``: steps between two accuracy
    checks on the monitor renders (:func:`train_judges`)."""

    seed: int = 0
    pool: int = 4000  # rendered images over all shapes x styles
    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    p_dark: float = 0.5
    p_clean: float = 0.125
    check_every: int = 250


def render_pool(seed: int, n: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """``n`` images over all shapes and styles with their (shape, style) labels."""
    scenes = [sample_scene(seed, i, shapes=SHAPES, styles=STYLES) for i in range(n)]
    images = np.stack([render(s) for s in scenes])
    shapes = torch.tensor([SHAPES.index(s.shape) for s in scenes])
    styles = torch.tensor([STYLES.index(s.style) for s in scenes])
    return images, shapes, styles


@torch.no_grad()
def vae_roundtrip(vae, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Encode (posterior mean) and decode images in [-1, 1] through a diffusers VAE."""
    out = [vae.decode(vae.encode(x[k:k + chunk]).latent_dist.mean).sample.clamp(-1, 1) for k in range(0, len(x), chunk)]
    return torch.cat(out)


def train_judges(config: JudgeTrainConfig, vae=None, progress=None,
                 monitor: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None) -> tuple[Judges, dict]:
    """Train both judges on one degraded pool; returns them (eval mode) and a log.

    ``progress(stage, done, total, losses)`` after every step (stage ``"judges"``). ``monitor``:
    (images, shape labels, style labels) of clean renders the judges never train on; their
    accuracy every ``config.check_every`` steps goes into the log (``"monitor"``).
    """
    t0 = time.perf_counter()
    images, shapes, styles = render_pool(config.seed + 7919, config.pool)
    x = to_input(images)
    if vae is not None:  # half of the pool also as VAE round trips
        half = config.pool // 2
        x = torch.cat([x, vae_roundtrip(vae, x[:half])])
        shapes, styles = torch.cat([shapes, shapes[:half]]), torch.cat([styles, styles[:half]])
    judges = Judges.fresh(config.seed)
    nets = [judges.shape_net.train(), judges.style_net.train()]
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-4)
    g = torch.Generator("cpu").manual_seed(config.seed)
    losses: list[float] = []
    checks: list[dict] = []
    for step in range(config.steps):
        idx = torch.randint(0, x.shape[0], (config.batch,), generator=g)
        xb = degrade(x[idx], g, p_dark=config.p_dark, p_clean=config.p_clean)
        lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(nets[0](xb), shapes[idx]) + F.cross_entropy(nets[1](xb), styles[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress("judges", step + 1, config.steps, {"loss": losses[-1]})
        if monitor is not None and ((step + 1) % config.check_every == 0 or step + 1 == config.steps):
            checks.append({"step": step + 1, **_accuracy_on(judges, *monitor)})
            log.info("judges step %d: monitor accuracy %s", step + 1, checks[-1])
            for n in nets:
                n.train()
    for n in nets:
        n.eval()
    log_ = {"steps": config.steps, "pool": config.pool, "vae_roundtrips": vae is not None,
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__}, "monitor": checks,
            "loss": [float(np.mean(losses[k:k + 50])) for k in range(0, len(losses), 50)],
            "seconds": time.perf_counter() - t0}
    return judges, log_


def accuracy(judges: Judges, seed: int, n: int) -> dict[str, float]:
    """Top-1 accuracy of both judges on ``n`` fresh clean renders over all shapes x styles."""
    return {**_accuracy_on(judges, *render_pool(seed, n)), "images": n}


def _accuracy_on(judges: Judges, images: np.ndarray, shapes: torch.Tensor, styles: torch.Tensor) -> dict[str, float]:
    judges.shape_net.eval(), judges.style_net.eval()
    v = judges(images)
    return {"shape": float((v.shape_probs.argmax(-1) == shapes).float().mean()),
            "style": float((v.style_probs.argmax(-1) == styles).float().mean())}
