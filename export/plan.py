"""Which models a repository needs: UNet variants under time-gated ACFG, names and content keys.

Under ACFG with time gates a content+style pair visits up to four weight sets during one
trajectory: content only (early), content + style (overlap), style only (late) and W_init
(unconditional branch, and steps where nothing is active). Each baked gate value listed
in the recipe multiplies those. A model's *key* is a hash of everything its weights
depend on, so identical weights are exported once and unchanged models are reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence

from craft_ops.aggregate import BASE, Variant

__all__ = ["FORMAT_VERSION", "PlanError", "parse_pairs", "plan_variants", "variant_model_name", "variant_key",
           "stable_hash"]

FORMAT_VERSION = 1


class PlanError(ValueError):
    """A ``--pairs`` selection that the recipe cannot satisfy."""


def stable_hash(obj: object) -> str:
    """sha256 of a JSON-serialisable object with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_pairs(text: str, kinds: Mapping[str, str]) -> list[tuple[str, str]]:
    """``all`` or ``content+style,...`` -> list of (content, style) names, checked against the recipe."""
    contents = sorted(n for n, k in kinds.items() if k == "content")
    styles = sorted(n for n, k in kinds.items() if k == "style")
    if text.strip() == "all":
        return [(c, s) for c in contents for s in styles]
    if text.strip() in ("", "none"):
        return []
    pairs = []
    for item in text.split(","):
        c, sep, s = item.strip().partition("+")
        if not sep:
            raise PlanError(f"--pairs: {item!r} is not CONTENT+STYLE")
        if kinds.get(c) != "content":
            raise PlanError(f"--pairs: {c!r} is not a content LoRA of the recipe; content LoRAs: {contents}")
        if kinds.get(s) != "style":
            raise PlanError(f"--pairs: {s!r} is not a style LoRA of the recipe; style LoRAs: {styles}")
        pairs.append((c, s))
    return sorted(set(pairs))


def plan_variants(
    kinds: Mapping[str, str],
    gammas: Mapping[str, Sequence[float]],
    pairs: Iterable[tuple[str, str]],
) -> list[Variant]:
    """W_init, each LoRA alone at each baked gate, and each pair at each gate combination."""
    variants = [BASE]
    for name in sorted(kinds):
        for g in gammas[name]:
            variants.append(Variant(content=name, gamma_c=g) if kinds[name] == "content" else Variant(style=name, gamma_s=g))
    for c, s in pairs:
        for gc in gammas[c]:
            for gs in gammas[s]:
                variants.append(Variant(c, gc, s, gs))
    return list(dict.fromkeys(variants))


def _gamma_suffix(g: float) -> str:
    return "" if g == 1.0 else f"-g{round(g * 100):03d}"


def variant_model_name(v: Variant) -> str:
    """Readable, stable Triton model names: ``unet_base``, ``unet_c-dog``, ``unet_c-dog-g050_s-ink``."""
    if v.is_base:
        return "unet_base"
    parts = ["unet"]
    if v.content:
        parts.append(f"c-{v.content}{_gamma_suffix(v.gamma_c)}")
    if v.style:
        parts.append(f"s-{v.style}{_gamma_suffix(v.gamma_s)}")
    return "_".join(parts)


def variant_key(
    v: Variant,
    w_init_key: str,
    lora_keys: Mapping[str, str],
    routed_modules: Mapping[str, Sequence[str]],
    build: Mapping[str, object],
) -> str:
    """Content key of a variant's weights: W_init, each active LoRA's routed part and gate, build settings.

    A LoRA whose routed module set is empty contributes nothing, so such a variant shares
    the key (and the exported model) of the variant without it.
    """
    active = []
    for name, gamma in ((v.content, v.gamma_c), (v.style, v.gamma_s)):
        if name and routed_modules[name]:
            active.append({"lora": lora_keys[name], "modules": sorted(routed_modules[name]), "gamma": gamma})
    active.sort(key=lambda a: a["lora"])
    return stable_hash({"v": FORMAT_VERSION, "network": "unet", "w_init": w_init_key, "active": active, "build": dict(build)})
