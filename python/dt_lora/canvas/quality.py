"""The canvas world's measurements: the model card's numbers and what the tests check.

`measure` draws every character by name and every style on every object by description, with seeds
from `EVAL_SEED` (never used by the build), and reads them with the evaluator. `read_renders` scores
the evaluator itself on renders drawn with seeds the evaluator never trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dt_lora.base.generate import generate_images
from dt_lora.canvas import world
from dt_lora.canvas.evaluator import NONE, Evaluator, Reading

EVAL_SEED = 1_000_000
ATTRIBUTES = ("object", "colour", "style", "mark")
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0


def _share(hits) -> float:
    hits = list(hits)
    return float(np.mean(hits)) if hits else float("nan")


@dataclass
class CanvasQuality:
    # character name → share of its images read as that character
    characters: dict[str, float] = field(default_factory=dict)
    # attribute → share of descriptions whose images show it ("object", "colour", "style", "mark")
    attributes: dict[str, float] = field(default_factory=dict)
    # (object, style) → share of descriptions drawn with both right
    style_on_object: dict[tuple[str, str], float] = field(default_factory=dict)
    images: np.ndarray | None = None

    def group_rates(self) -> dict[int, float]:
        """Per group of near neighbours, the mean of its characters' rates."""
        groups: dict[int, list[float]] = {}
        for character in world.characters():
            groups.setdefault(character.group, []).append(self.characters[character.name])
        return {g: float(np.mean(rates)) for g, rates in groups.items()}


def character_prompts(per_character: int, templates=world.CHARACTER_TEMPLATES) -> tuple[list[str], list[str]]:
    """(prompts, the character each names), `per_character` each, cycling through `templates`."""
    names = [c.name for c in world.characters() for _ in range(per_character)]
    prompts = [world.character_prompt(n, templates[k % len(templates)]) for k, n in enumerate(names)]
    return prompts, names


def description_looks(per_pair: int) -> list[world.Look]:
    """`per_pair` looks for every (object, style), colours and marks cycling so each appears evenly."""
    styles = (world.PLAIN,) + world.STYLES
    marks = (world.NO_MARK,) + world.MARKS
    looks = []
    for i, (object_, style) in enumerate((o, s) for o in world.OBJECTS for s in styles):
        for k in range(per_pair):
            n = i * per_pair + k
            looks.append(world.Look(object_, world.COLOURS[n % len(world.COLOURS)], style, marks[(n // 3) % len(marks)]))
    return looks


def measure(pipeline, evaluator: Evaluator, *, per_character: int = 8, per_pair: int = 4,
            steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> CanvasQuality:
    prompts, names = character_prompts(per_character)
    looks = description_looks(per_pair)
    described = [world.description_prompt(look, world.DESCRIPTION_TEMPLATES[k % len(world.DESCRIPTION_TEMPLATES)])
                 for k, look in enumerate(looks)]
    images = generate_images(pipeline, prompts + described, seed=EVAL_SEED, steps=steps, guidance=guidance)
    readings = evaluator.read(images)
    quality = CanvasQuality(images=images)
    for name in dict.fromkeys(names):
        quality.characters[name] = _share(r.character == name for r, n in zip(readings, names) if n == name)
    drawn = readings[len(prompts):]
    quality.attributes = attribute_accuracy(drawn, looks)
    for object_ in world.OBJECTS:
        for style in (world.PLAIN,) + world.STYLES:
            quality.style_on_object[object_, style] = _share(
                r.look is not None and r.look.object == object_ and r.look.style == style
                for r, look in zip(drawn, looks) if (look.object, look.style) == (object_, style))
    return quality


def attribute_accuracy(readings: Sequence[Reading], looks: Sequence[world.Look]) -> dict[str, float]:
    """Per attribute, the share of readings that read it as the look it belongs with has it."""
    return {attribute: _share(r.look is not None and getattr(r.look, attribute) == getattr(look, attribute)
                              for r, look in zip(readings, looks))
            for attribute in ATTRIBUTES}


def read_renders(evaluator: Evaluator, count: int = 2000, seed: int = EVAL_SEED) -> dict[str, float]:
    """The evaluator's accuracy per attribute (and identity) on `count` renders, and on tile soup
    ("scrambled none": the share of Scrambled Grid renders it reads as no object)."""
    from dt_lora.scramble import scramble_grid

    images, scenes = world.sample(count, seed, character_rate=0.3)
    readings = evaluator.read(images)
    scores = attribute_accuracy(readings, [s.look for s in scenes])
    scores["character"] = _share(r.character == s.character for r, s in zip(readings, scenes) if s.character)
    soup = evaluator.read(scramble_grid(images, 4, seed, layout="NHWC"))
    scores["scrambled none"] = _share(r.object == NONE for r in soup)
    return scores
