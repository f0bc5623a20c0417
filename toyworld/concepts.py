"""The held-out concepts and their training data: content / style LoRAs and the Rank-FT backbone.

Each held-out shape is a *content* concept taught with ``a sks object <c>`` on images of the
shape in mixed base styles and colours (DreamBooth: the rare token ``sks`` binds the new
shape); each held-out style is a *style* concept taught with ``an object in zzs style <s>``
on images of the style on mixed base shapes. Combined prompts read
``a sks object <c> in zzs style <s>``. Because the text encoder is causal, the tokens of
``a sks object`` encode exactly as in the content LoRA's prompt.

LoRAs are trained with the project's trainer (:func:`craft_training.lora.train_lora`),
four ways, as the benchmark's methods need:

============  ===========  ========================================================
layers        base         used by
============  ===========  ========================================================
``routed``    W_init       CRAFT-LoRA, "no time gates", "CFG instead of ACFG", demo
``routed``    W0           "no Rank-FT"
``all``       W0           direct merge (ordinary LoRAs, summed)
``all``       W_init       "no routing"
============  ===========  ========================================================

``routed`` = the LoRA target modules (:data:`LORA_TARGETS`) inside the kind's layer set of
:data:`TOY_ROUTING` (Eq. 7); ``all`` = the same modules in every block. The toy UNet's decoder
has three blocks: ``up_blocks.0`` (4x4 latents), ``up_blocks.1`` (8x8) and ``up_blocks.2``
(16x16). Content gets the encoder, the bottleneck and the two low-resolution decoder blocks,
style the full-resolution decoder block only. With the ``sd15`` preset (content: encoder +
bottleneck, style: the whole decoder) the style LoRA's decoder redraws the outline and the
routed content LoRA alone barely draws the held-out shape (tuning seeds: CRAFT content 0.03-0.08);
with content through ``up_blocks.1`` it does (0.34-0.89, see the tuning log in
``benchmarks/results``). The SDXL preset likewise gives content the first decoder attention. The targets are the attention projections *and* the transformer
feed-forward / ``proj_in`` / ``proj_out`` and the ResNet convolutions: on this small UNet,
attention-only LoRAs (rank 8, 400 steps) did not teach a new shape (tuning seeds 0-15: 4/16
stars all-layer, 0/16 routed), with the convolutions they did (16/16 and 11/16; helper tw-lora's
tuning log). The Rank-FT backbone comes from :func:`craft_training.backbone.train_backbone`
on the references: the first images of every content concept (content set) and of every
style concept (style set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .world import BASE_SHAPES, BASE_STYLES, HELD_OUT_SHAPES, HELD_OUT_STYLES, WorldError, render, sample_scene

log = logging.getLogger(__name__)

__all__ = ["Concept", "CONCEPTS", "CONTENT_PROMPT", "STYLE_PROMPT", "pair_prompt", "concept", "write_concept_images",
           "LoraSettings", "RankFTSettings", "train_concept_lora", "train_rankft", "layer_routing", "LAYERS", "LORA_SETS",
           "write_references", "LORA_TARGETS", "TOY_ROUTING"]

CONTENT_PROMPT = "a sks object <c>"
STYLE_PROMPT = "an object in zzs style <s>"
LAYERS = ("routed", "all")
# LoRA set -> (layers, trained on W_init)
LORA_SETS = {"routed_winit": ("routed", True), "all_w0": ("all", False), "routed_w0": ("routed", False),
             "all_winit": ("all", True)}
_BLOCKS = ("down_blocks", "mid_block", "up_blocks")
# Eq. 7 layer sets of the toy UNet (three down / three up blocks); see the module docstring.
TOY_ROUTING = {"name": "toy", "content": ["down_blocks", "mid_block", "up_blocks.0", "up_blocks.1"],
               "style": ["up_blocks.2"]}
# Modules a concept LoRA adapts (name suffixes): attention, transformer MLP and projections, ResNet convs.
LORA_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
    "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
)


def pair_prompt() -> str:
    """The benchmark / demo prompt for a content + style pair."""
    return "a sks object <c> in zzs style <s>"


@dataclass(frozen=True)
class Concept:
    """One held-out shape (content) or style (style) and the LoRA that teaches it."""

    name: str  # the LoRA name (= the shape / style)
    kind: str  # "content" | "style"
    prompt: str

    @property
    def token(self) -> str:
        return "sks" if self.kind == "content" else "zzs"

    @property
    def teaches(self) -> str:
        return f"the held-out {'shape' if self.kind == 'content' else 'style'} '{self.name}'"


CONCEPTS: tuple[Concept, ...] = (
    *(Concept(s, "content", CONTENT_PROMPT) for s in HELD_OUT_SHAPES),
    *(Concept(s, "style", STYLE_PROMPT) for s in HELD_OUT_STYLES),
)


def concept(name: str) -> Concept:
    for c in CONCEPTS:
        if c.name == name:
            return c
    raise WorldError(f"concept: unknown LoRA concept {name!r}; choose one of {[c.name for c in CONCEPTS]}")


def write_concept_images(c: Concept, out: Path, n: int = 12, seed: int = 0) -> Path:
    """``n`` PNGs of the concept: the held-out shape in base styles, or the held-out style on base shapes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stream = 5000 + seed * 64 + CONCEPTS.index(c)
    for i in range(n):
        if c.kind == "content":
            scene = sample_scene(stream, i, shapes=(c.name,), styles=BASE_STYLES)
        else:
            scene = sample_scene(stream, i, shapes=BASE_SHAPES, styles=(c.name,))
        Image.fromarray(render(scene)).save(out / f"{c.name}-{i:02d}.png")
    return out


def layer_routing(kind: str, layers: str) -> str | dict:
    """The ``train_lora`` routing: :data:`TOY_ROUTING` (``routed``) or every block for ``kind`` (``all``)."""
    if layers == "routed":
        return dict(TOY_ROUTING)
    if layers != "all":
        raise WorldError(f"layers: must be one of {LAYERS}, got {layers!r}")
    # Routing sets must be disjoint and non-empty: the other kind gets conv_in, which holds no attention.
    everything, nothing = list(_BLOCKS), ["conv_in"]
    return {"name": "all", "content": everything if kind == "content" else nothing,
            "style": everything if kind == "style" else nothing}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    targets: tuple[str, ...] = LORA_TARGETS  # module-name suffixes the LoRA adapts
    style_steps: int | None = 600  # steps of the style LoRAs (None: ``steps``); texture is learnt slower

    def steps_for(self, kind: str) -> int:
        return self.style_steps if kind == "style" and self.style_steps is not None else self.steps


@dataclass(frozen=True)
class RankFTSettings:
    r_max: int = 8
    r_min: int = 2
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    evaluate: bool = True  # held-out loss of W0 / W_init at the start and end (train_log.json)


def train_concept_lora(base: Path, c: Concept, images: Path, out: Path, *, layers: str = "routed",
                       backbone: Path | None = None, settings: LoraSettings = LoraSettings(), progress=None):
    """One DreamBooth LoRA with the project's trainer; returns its :class:`LoraResult`."""
    from craft_training.config import LoraTrainConfig
    from craft_training.lora import train_lora

    config = LoraTrainConfig(
        base=base, backbone=backbone, images=images, kind=c.kind, prompt=c.prompt, out=out, rank=settings.rank,
        steps=settings.steps_for(c.kind), lr=settings.lr, resolution=64, routing=layer_routing(c.kind, layers),
        seed=settings.seed, batch_size=settings.batch_size,
        targets=tuple(settings.targets),
    )
    return train_lora(config, progress)


def train_rankft(base: Path, content_refs: Path, style_refs: Path, out: Path,
                 settings: RankFTSettings = RankFTSettings(), progress=None):
    """The W_init backbone (Rank-FT, Eq. 1-4) with the project's trainer; returns its result."""
    from craft_training.backbone import train_backbone
    from craft_training.config import BackboneConfig

    config = BackboneConfig(
        base=base, content_images=content_refs, style_images=style_refs, out=out, r_max=settings.r_max,
        r_min=settings.r_min, steps=settings.steps, lr=settings.lr, resolution=64, batch_size=settings.batch_size,
        seed=settings.seed, checkpoint_every=0, evaluate=settings.evaluate,
    )
    return train_backbone(config, progress)


def write_references(root: Path, per_concept: int = 5, seed: int = 0) -> tuple[Path, Path]:
    """Rank-FT references: the first ``per_concept`` images of every content / style concept."""
    content, style = Path(root) / "content", Path(root) / "style"
    for c in CONCEPTS:
        write_concept_images(c, content if c.kind == "content" else style, per_concept, seed)
    return content, style
