"""The toy world: a seeded, deterministic renderer of one textured shape on a plain background.

Content = the object's *shape*, style = its *texture* (the rendering of the fill). Colour,
position, size, rotation and the texture's angle and phase vary per image; the background
is a constant light grey. Every image is a pure function of a :class:`Scene`, and
:func:`sample_scene` draws a scene from ``numpy.random.default_rng([seed, index])``, so the
image with a given (seed, index) is the same on every machine and in any order.

Rendering: the shape's inside test and the texture are evaluated on a 4x super-sampled
grid (256 x 256 for 64 px) and box-filtered down, which anti-aliases edges and stripes.
Shapes are defined in an object frame where they fit the unit disc; the frame is scaled by
the scene's radius (pixels), rotated by ``angle`` and centred at ``(cx, cy)``. Textures are
a value ``t`` in [0, 1] per pixel mixing the primary colour (``t = 1``) with a dark shade
of it (``t = 0``, 30 % of the primary), so every texture keeps the object's silhouette
visible against the background. Texture periods are 7-9 px: two to three periods per
latent pixel pair of a factor-4 VAE, coarse enough to survive it.

Held out (never in the base model's training data): the shapes ``star``, ``heart`` and the
styles ``checker``, ``gradient``. They are what the content / style LoRAs teach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

__all__ = [
    "SHAPES", "STYLES", "COLORS", "HELD_OUT_SHAPES", "HELD_OUT_STYLES", "BASE_SHAPES", "BASE_STYLES",
    "SIZE", "WorldError", "Scene", "sample_scene", "render", "render_many", "write_renders", "caption",
]

SIZE = 64  # pixels
_SS = 4  # super-sampling factor
BACKGROUND = (0.9, 0.9, 0.9)
_DARK = 0.3  # the texture's second colour is this fraction of the primary

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "crescent", "arrow", "star", "heart")
STYLES = ("solid", "stripes", "waves", "dots", "grid", "concentric", "outline", "rays", "checker", "gradient")
HELD_OUT_SHAPES = ("star", "heart")
HELD_OUT_STYLES = ("checker", "gradient")
BASE_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
BASE_STYLES = tuple(s for s in STYLES if s not in HELD_OUT_STYLES)
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.15), "orange": (0.95, 0.55, 0.1), "yellow": (0.95, 0.85, 0.15),
    "green": (0.2, 0.7, 0.25), "cyan": (0.15, 0.75, 0.85), "blue": (0.2, 0.3, 0.9),
    "purple": (0.6, 0.25, 0.8), "pink": (0.95, 0.45, 0.7),
}


class WorldError(ValueError):
    """An unknown shape, style or colour, or a bad count / seed; the message names the field."""


@dataclass(frozen=True)
class Scene:
    """Everything one image depends on."""

    shape: str
    style: str
    color: str
    cx: float  # object centre, pixels
    cy: float
    radius: float  # pixels: the unit disc of the object frame
    angle: float  # shape rotation, radians
    tex_angle: float  # texture rotation, radians
    phase: tuple[float, float]  # texture phase, fractions of a period

    def __post_init__(self) -> None:
        check_name("shape", self.shape, SHAPES)
        check_name("style", self.style, STYLES)
        check_name("color", self.color, tuple(COLORS))


def check_name(field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise WorldError(f"{field}: unknown {field} {value!r}; choose one of {list(allowed)}")
    return value


# -- scenes -------------------------------------------------------------------------------------


def sample_scene(seed: int, index: int, *, shapes=BASE_SHAPES, styles=BASE_STYLES, colors=tuple(COLORS)) -> Scene:
    """Scene ``index`` of the stream ``seed``: uniform shape / style / colour, jittered geometry."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise WorldError(f"seed: must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng([seed, index])
    shape = shapes[int(rng.integers(len(shapes)))]
    style = styles[int(rng.integers(len(styles)))]
    color = colors[int(rng.integers(len(colors)))]
    radius = float(rng.uniform(19.0, 26.0))
    room = 32.0 - radius - 2.0
    cx, cy = (32.0 + float(rng.uniform(-1, 1)) * min(room, 5.0) for _ in range(2))
    angle = math.radians(float(rng.uniform(-10, 10)))
    tex_angle = math.radians(float(rng.uniform(-10, 10)))
    phase = (float(rng.uniform()), float(rng.uniform()))
    return Scene(shape, style, color, cx, cy, radius, angle, tex_angle, phase)


# -- shapes: inside tests in the object frame (x right, y up, the shape inside the unit disc) ---------


def _polygon(x: np.ndarray, y: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xint)
    return inside


def _star_points(n: int = 5, outer: float = 1.0, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = outer if k % 2 == 0 else inner
        a = math.pi / 2 + k * math.pi / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


_TRIANGLE = [(math.cos(a) * 0.98, math.sin(a) * 0.98 - 0.12) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
_ARROW = [(-0.9, 0.25), (0.15, 0.25), (0.15, 0.7), (0.95, 0.0), (0.15, -0.7), (0.15, -0.25), (-0.9, -0.25)]
_STAR = _star_points()


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    X, Y = x / 0.82, (y + 0.12) / 0.82
    return (X * X + Y * Y - 1.0) ** 3 - X * X * Y ** 3 < 0


_INSIDE = {
    "circle": lambda x, y: x * x + y * y < 0.9 ** 2,
    "square": lambda x, y: np.maximum(np.abs(x), np.abs(y)) < 0.72,
    "triangle": lambda x, y: _polygon(x, y, _TRIANGLE),
    "diamond": lambda x, y: np.abs(x) / 0.62 + np.abs(y) / 0.98 < 1.0,
    "cross": lambda x, y: ((np.abs(x) < 0.3) & (np.abs(y) < 0.92)) | ((np.abs(y) < 0.3) & (np.abs(x) < 0.92)),
    "ring": lambda x, y: (x * x + y * y < 0.95 ** 2) & (x * x + y * y > 0.5 ** 2),
    "crescent": lambda x, y: (x * x + y * y < 0.92 ** 2) & ((x - 0.42) ** 2 + (y - 0.12) ** 2 > 0.72 ** 2),
    "arrow": lambda x, y: _polygon(x, y, _ARROW),
    "star": lambda x, y: _polygon(x, y, _STAR),
    "heart": _heart,
}


# -- textures: t in [0, 1] on image-frame coordinates (pixels) ------------------------------------


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary erosion by a (2k+1)^2 square, separable (for the outline style)."""
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(k, k) if a == axis else (0, 0) for a in (0, 1)], constant_values=False)
        n = out.shape[axis]
        acc = np.ones_like(out)
        for s in range(2 * k + 1):
            acc &= padded[s:s + n, :] if axis == 0 else padded[:, s:s + n]
        out = acc
    return out


def _texture(scene: Scene, u: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Texture value per sample; ``u, v`` are texture-frame pixel offsets from the object centre."""
    p0, p1 = scene.phase
    style = scene.style
    if style == "solid":
        return np.ones_like(u)
    if style == "stripes":  # diagonal bands, period 8 px
        return (np.mod((u + v) / math.sqrt(2) / 8.0 + p0, 1.0) < 0.5).astype(float)
    if style == "waves":  # horizontal bands bent by a sine, period 8 px
        return (np.mod((v + 2.5 * np.sin(2 * math.pi * (u / 16.0 + p1))) / 8.0 + p0, 1.0) < 0.5).astype(float)
    if style == "dots":  # dark dots of radius 2.6 on a 9 px lattice
        du, dv = np.mod(u / 9.0 + p0, 1.0) - 0.5, np.mod(v / 9.0 + p1, 1.0) - 0.5
        return (np.hypot(du, dv) * 9.0 > 2.6).astype(float)
    if style == "grid":  # dark lines 2.25 px wide every 9 px
        return ~((np.mod(u / 9.0 + p0, 1.0) < 0.25) | (np.mod(v / 9.0 + p1, 1.0) < 0.25)) * 1.0
    if style == "concentric":  # rings around the object centre, period 7 px
        return (np.mod(np.hypot(u, v) / 7.0 + p0, 1.0) < 0.5).astype(float)
    if style == "outline":  # a 4 px band of the primary colour along the edge, dark inside
        return (mask & ~_erode(mask, 4 * _SS)).astype(float)
    if style == "rays":  # 8 wedges from the centre
        return (np.mod(np.arctan2(v, u) / (2 * math.pi) * 8.0 + p0, 1.0) < 0.5).astype(float)
    if style == "checker":  # 7 px squares
        return (np.mod(np.floor(u / 7.0 + p0) + np.floor(v / 7.0 + p1), 2.0) < 1.0).astype(float)
    if style == "gradient":  # a ramp across the object along a random direction
        a = 2 * math.pi * p0
        d = (u * math.cos(a) + v * math.sin(a)) / scene.radius  # (-1, 1) across the object
        return np.clip(0.5 + 0.6 * d, 0.0, 1.0)
    raise WorldError(f"style: unknown style {style!r}")


# -- rendering --------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    n = size * _SS
    c = ((np.arange(n) + 0.5) / _SS).astype(np.float32)  # sample centres in pixels
    return np.meshgrid(c, c, indexing="xy")  # (n, n) each: x right, y down


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """One image, (size, size, 3) uint8."""
    X, Y = _grid(size)
    dx, dy = X - scene.cx, Y - scene.cy
    ca, sa = math.cos(-scene.angle), math.sin(-scene.angle)
    x = (ca * dx - sa * dy) / scene.radius  # object frame, y up
    y = -(sa * dx + ca * dy) / scene.radius
    mask = _INSIDE[scene.shape](x, y)
    ct, st = math.cos(-scene.tex_angle), math.sin(-scene.tex_angle)
    u, v = ct * dx - st * dy, st * dx + ct * dy
    t = _texture(scene, u, v, mask)
    primary = np.asarray(COLORS[scene.color], dtype=np.float32)
    bg = np.asarray(BACKGROUND, dtype=np.float32)
    t = np.where(mask, t.astype(np.float32), np.float32(0))
    # per sample: background outside, primary * (DARK + (1 - DARK) t) inside
    img = mask[..., None] * (primary * (_DARK + (1 - _DARK) * t[..., None]) - bg) + bg  # (n, n, 3)
    img = img.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def write_renders(out, *, shape: str | None = None, style: str | None = None, color: str | None = None,
                  n: int = 8, seed: int = 0) -> list:
    """Write ``n`` ground-truth PNGs (``<shape>-<style>-<color>-<seed>-<i>.png``) into ``out``; returns the paths.

    ``None`` draws the shape / style / colour per image from all of them (held-out ones included).
    """
    from pathlib import Path

    from PIL import Image

    shapes = (check_name("shape", shape, SHAPES),) if shape else SHAPES
    styles = (check_name("style", style, STYLES),) if style else STYLES
    colors = (check_name("color", color, tuple(COLORS)),) if color else tuple(COLORS)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise WorldError(f"n: must be a positive integer, got {n!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        scene = sample_scene(seed, i, shapes=shapes, styles=styles, colors=colors)
        paths.append(out / f"{scene.shape}-{scene.style}-{scene.color}-{seed}-{i:04d}.png")
        Image.fromarray(render(scene)).save(paths[-1])
    return paths


def render_many(shape: str | None, style: str | None, n: int, seed: int, *, start: int = 0,
                shapes=SHAPES, styles=STYLES) -> tuple[np.ndarray, list[Scene]]:
    """``n`` images (n, 64, 64, 3) uint8 of ``shape`` / ``style`` (``None``: drawn from ``shapes`` / ``styles``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise WorldError(f"n: must be a positive integer, got {n!r}")
    if shape is not None:
        shapes = (check_name("shape", shape, SHAPES),)
    if style is not None:
        styles = (check_name("style", style, STYLES),)
    scenes = [sample_scene(seed, start + i, shapes=shapes, styles=styles) for i in range(n)]
    return np.stack([render(s) for s in scenes]), scenes


# -- captions -------------------------------------------------------------------------------------------

# (template, weight); the empty caption trains the unconditional branch of classifier-free guidance.
_TEMPLATES = (
    ("a {color} {shape} with {style}", 4), ("a {shape} with {style}", 2), ("a {color} {shape} in {style} style", 2),
    ("a {shape} in {style} style", 2), ("a {color} {shape}", 1), ("a {shape}", 1), ("an object with {style}", 1),
    ("an object in {style} style", 1), ("a {color} object", 1), ("", 2),
)
CAPTION_WORDS = ("a", "an", "with", "in", "style", "object", *SHAPES, *STYLES, *COLORS)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of the scene from a weighted template (some name only part of it, one is empty)."""
    weights = np.array([w for _, w in _TEMPLATES], dtype=float)
    template = _TEMPLATES[int(rng.choice(len(_TEMPLATES), p=weights / weights.sum()))][0]
    return template.format(color=scene.color, shape=scene.shape, style=scene.style)


def full_caption(scene: Scene) -> str:
    return f"a {scene.color} {scene.shape} with {scene.style}"


def with_style(scene: Scene, style: str) -> Scene:
    return replace(scene, style=check_name("style", style, STYLES))
