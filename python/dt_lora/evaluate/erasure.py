"""Erasure at scale on the canvas world, measured as the field reports it.

Characters (MACE's protocol): N characters erased together; every character drawn by name with the
world's held-out phrasings (no recipe uses them) and read by the canvas evaluator.
  Acc_e  the share of the erased characters' images still read as them (lower is better)
  Acc_p  the share of the kept characters' images read as them; the erased characters' near neighbours
         (their group mates, one attribute away) are reported apart from the rest
  H_c    the harmonic mean of 1 − Acc_e and Acc_p
Descriptions (every object in every style, colours and marks cycling, held-out phrasings) say what the
rest of the world keeps: the share of images whose object, colour, style and mark read right.

Styles (UnlearnCanvas' protocol): every object drawn "in the style of" every artist, held-out phrasing.
For each erased style:
  UA   the share of its images not read in that style (unlearning accuracy)
  IRA  the share of the other styles' images still read in their own (in-domain retain accuracy)
  CRA  the share of every style's images whose object reads right (cross-domain retain accuracy)

Every share comes with Wilson's 95 % interval over its images. Images of one character share its
prompt, so the interval is narrower than one over characters would be; the per-character rates are in
the result too. `measure_characters` and `measure_styles` draw and read; `character_erasure` and
`style_erasure` score what they read, so one drawing serves every N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dt_lora.base.generate import generate_images
from dt_lora.canvas import world
from dt_lora.canvas.evaluator import Evaluator
from dt_lora.canvas.quality import (
    ATTRIBUTES,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    attribute_accuracy,
    character_prompts,
    description_looks,
)
from dt_lora.search import rate_interval

BENCH_SEED = 2_000_000  # never used by the build, the recipes' training, or the model card (1,000,000 and 1,100,000)


def erasure_order() -> list[str]:
    """The order characters are erased in: every group's first, then every group's second, and so on. The
    first 25 leave each group's three near neighbours kept, and measured as neighbours."""
    groups: dict[int, list[str]] = {}
    for character in world.characters():
        groups.setdefault(character.group, []).append(character.name)
    return [members[k] for k in range(world.GROUP_SIZE) for members in groups.values()]


def rate(hits: Sequence[bool]) -> dict:
    """A share with its 95 % interval and count: {"rate", "low", "high", "images"}."""
    hits = [bool(h) for h in hits]
    if not hits:
        return {"rate": float("nan"), "low": float("nan"), "high": float("nan"), "images": 0}
    low, high = rate_interval(sum(hits), len(hits))
    return {"rate": float(np.mean(hits)), "low": low, "high": high, "images": len(hits)}


@dataclass
class CharacterReadings:
    hits: dict[str, list[bool]]  # character → for each of its images, whether it reads as that character
    descriptions: dict[str, float]  # attribute → share of description images that read it right


def measure_characters(pipeline, evaluator: Evaluator, *, per_character: int = 4, per_pair: int = 2,
                       seed: int = BENCH_SEED, steps: int = DEFAULT_STEPS,
                       guidance: float = DEFAULT_GUIDANCE) -> CharacterReadings:
    """Draw every character by name and every (object, style) by description, held-out phrasings only."""
    prompts, names = character_prompts(per_character, world.CHARACTER_HELDOUT_TEMPLATES)
    looks = description_looks(per_pair)
    described = world.description_prompts(looks, world.DESCRIPTION_HELDOUT_TEMPLATES)
    readings = evaluator.read(generate_images(pipeline, prompts + described, seed=seed, steps=steps,
                                              guidance=guidance))
    hits: dict[str, list[bool]] = {}
    for name, reading in zip(names, readings):
        hits.setdefault(name, []).append(reading.character == name)
    return CharacterReadings(hits, attribute_accuracy(readings[len(prompts):], looks))


def character_erasure(shielded: CharacterReadings, base: CharacterReadings, erased: Sequence[str]) -> dict:
    """MACE's numbers for `erased`, from readings of the shielded model and of the base (same seeds)."""
    erased = set(erased)
    unknown = erased - set(base.hits)
    if unknown:
        raise ValueError(f"unknown canvas characters: {', '.join(sorted(unknown))}")
    groups = {c.group for c in world.characters() if c.name in erased}
    neighbours = {c.name for c in world.characters() if c.group in groups} - erased

    def pooled(readings: CharacterReadings, names) -> dict:
        return rate([h for name in sorted(names) for h in readings.hits[name]])

    kept = set(base.hits) - erased
    acc_e, acc_p = pooled(shielded, erased), pooled(shielded, kept)
    result = {
        "erased": len(erased),
        "acc_e": acc_e,
        "acc_p": acc_p,
        "acc_p_neighbours": pooled(shielded, neighbours),
        "acc_p_others": pooled(shielded, kept - neighbours),
        "base_acc_e": pooled(base, erased),
        "base_acc_p": pooled(base, kept),
        "base_acc_p_neighbours": pooled(base, neighbours),
        "descriptions": {a: shielded.descriptions[a] for a in ATTRIBUTES},
        "base_descriptions": {a: base.descriptions[a] for a in ATTRIBUTES},
        "per_character": {name: float(np.mean(hits)) for name, hits in shielded.hits.items()},
    }
    kept_share = acc_p["rate"]
    if kept and kept_share > 0 and acc_e["rate"] < 1:
        result["h_c"] = 2 / (1 / (1 - acc_e["rate"]) + 1 / kept_share)
    return result


@dataclass
class StyleReadings:
    styles: list[str]  # the style each image was asked for
    read_styles: list[str | None]  # the style read (None: no object read)
    objects_right: list[bool]


def measure_styles(pipeline, evaluator: Evaluator, *, per_pair: int = 2, seed: int = BENCH_SEED + 500_000,
                   steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> StyleReadings:
    """Draw every object in every artist's style (colours cycling), the held-out phrasings."""
    looks = [world.Look(o, world.COLOURS[(i + k) % len(world.COLOURS)], s)
             for i, (o, s) in enumerate((o, s) for s in world.STYLES for o in world.OBJECTS) for k in range(per_pair)]
    prompts = world.description_prompts(looks, world.DESCRIPTION_HELDOUT_TEMPLATES)
    readings = evaluator.read(generate_images(pipeline, prompts, seed=seed, steps=steps, guidance=guidance))
    return StyleReadings([look.style for look in looks],
                         [r.look.style if r.look is not None else None for r in readings],
                         [r.look is not None and r.look.object == look.object for r, look in zip(readings, looks)])


def style_erasure(shielded: StyleReadings, base: StyleReadings, erased: Sequence[str]) -> dict:
    """UnlearnCanvas' numbers for each style in `erased`, and their mean; the base's beside them."""

    def scores(readings: StyleReadings, style: str) -> dict:
        own = [read == style for asked, read in zip(readings.styles, readings.read_styles) if asked == style]
        others = [read == asked for asked, read in zip(readings.styles, readings.read_styles)
                  if asked != style and asked not in erased]
        return {"ua": rate([not hit for hit in own]), "ira": rate(others), "cra": rate(readings.objects_right)}

    unknown = set(erased) - set(world.STYLES)
    if unknown:
        raise ValueError(f"unknown canvas styles: {', '.join(sorted(unknown))}")
    per_style = {style: {"shielded": scores(shielded, style), "base": scores(base, style)} for style in erased}
    mean = {key: float(np.mean([s["shielded"][key]["rate"] for s in per_style.values()])) for key in ("ua", "ira", "cra")}
    return {"erased": list(erased), "per_style": per_style, "mean": mean}


__all__ = ["BENCH_SEED", "CharacterReadings", "StyleReadings", "character_erasure", "erasure_order",
           "measure_characters", "measure_styles", "rate", "style_erasure"]
