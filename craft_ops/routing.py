"""Layer routing: disjoint content / style layer sets I_c and I_s (CRAFT-LoRA Eq. 7)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["RoutingError", "Routing", "PRESETS", "resolve_routing"]


class RoutingError(ValueError):
    """Bad routing configuration (unknown preset, overlapping sets, prefixes matching nothing)."""


@dataclass(frozen=True)
class Routing:
    """Module-name prefixes of the content set I_c and the style set I_s (Eq. 7)."""

    name: str
    content: tuple[str, ...]
    style: tuple[str, ...]

    def __post_init__(self) -> None:
        for field, prefixes in (("content", self.content), ("style", self.style)):
            if not prefixes:
                raise RoutingError(f"routing {self.name!r}: {field} layer set is empty")
            for p in prefixes:
                if not isinstance(p, str) or not p or p != p.strip(". "):
                    raise RoutingError(f"routing {self.name!r}: bad {field} prefix {p!r}")
        for c in self.content:
            for s in self.style:
                if _covers(c, s) or _covers(s, c):
                    raise RoutingError(f"routing {self.name!r}: content prefix {c!r} overlaps style prefix {s!r}")

    def layer_set(self, module: str) -> str | None:
        """``"content"``, ``"style"`` or ``None`` for a UNet module name."""
        if any(_covers(p, module) for p in self.content):
            return "content"
        if any(_covers(p, module) for p in self.style):
            return "style"
        return None

    def select(self, kind: str, modules: Iterable[str]) -> list[str]:
        """The modules of ``modules`` that lie in the set of ``kind`` (``content``/``style``)."""
        if kind not in ("content", "style"):
            raise RoutingError(f"kind must be 'content' or 'style', got {kind!r}")
        return [m for m in modules if self.layer_set(m) == kind]

    def check_against(self, module_names: Sequence[str]) -> None:
        """Every prefix must match at least one module of the UNet."""
        for field, prefixes in (("content", self.content), ("style", self.style)):
            for p in prefixes:
                if not any(_covers(p, m) for m in module_names):
                    raise RoutingError(f"routing {self.name!r}: {field} prefix {p!r} matches no UNet module")

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "content": list(self.content), "style": list(self.style)}


def _covers(prefix: str, module: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# SDXL: the paper's sets exactly (CRAFT.md). The reference also lists ``up_blocks.3``, which
# diffusers' SDXL UNet (three up blocks) does not have; ``down_blocks.2`` is in neither set.
_SDXL = Routing(
    name="sdxl",
    content=("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0.attentions.0"),
    style=("up_blocks.0.attentions.1", "up_blocks.1", "up_blocks.2"),
)
# SD 1.5: the paper gives none; same logic (encoder + bottleneck = structure, decoder = texture).
_SD15 = Routing(
    name="sd15",
    content=("down_blocks", "mid_block"),
    style=("up_blocks",),
)

PRESETS: Mapping[str, Routing] = {"sdxl": _SDXL, "sd15": _SD15}


def resolve_routing(spec: str | Mapping[str, Sequence[str]]) -> Routing:
    """A preset by name or ``{"content": [...], "style": [...]}`` user prefix lists."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise RoutingError(f"routing: unknown preset {spec!r}; choose one of {sorted(PRESETS)} or give prefix lists")
        return PRESETS[spec]
    if not isinstance(spec, Mapping):
        raise RoutingError(f"routing must be a preset name or a table with content/style lists, got {spec!r}")
    unknown = set(spec) - {"content", "style", "name"}
    if unknown:
        raise RoutingError(f"routing: unknown keys {sorted(unknown)}")
    try:
        content = tuple(spec["content"])
        style = tuple(spec["style"])
    except KeyError as exc:
        raise RoutingError(f"routing: missing {exc.args[0]!r} list") from exc
    return Routing(name=str(spec.get("name", "custom")), content=content, style=style)
