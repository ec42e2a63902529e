"""The canvas world's measurements: the model card's numbers and what the tests check.

`measure` draws every character by name and every style on every object by description, with seeds
from `EVAL_SEED` (never used by the build), and reads them with the evaluator. `read_renders` scores
the evaluator itself on renders drawn with seeds the evaluator never trained on. `recheck` draws
borderline characters and cells again, with seeds of their own, for the card's verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dt_lora.base.generate import generate_images
from dt_lora.canvas import world
from dt_lora.canvas.evaluator import NONE, Evaluator, Reading

EVAL_SEED = 1_000_000
RECHECK_SEED = 1_100_000  # the card's second look at borderline characters and cells (research/canvas-world.md)
RECHECK_IMAGES = 64
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


def character_prompts(per_character: int, templates=world.CHARACTER_TEMPLATES,
                      characters: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(prompts, the character each names), `per_character` each of `characters` (default: every one),
    cycling through `templates`."""
    characters = [c.name for c in world.characters()] if characters is None else characters
    names = [n for n in characters for _ in range(per_character)]
    prompts = [world.character_prompt(n, templates[k % len(templates)]) for k, n in enumerate(names)]
    return prompts, names


def description_looks(per_pair: int, cells: Sequence[tuple[str, str]] | None = None) -> list[world.Look]:
    """`per_pair` looks for every (object, style) of `cells` (default: every one), colours and marks
    cycling so each appears evenly."""
    styles = (world.PLAIN,) + world.STYLES
    marks = (world.NO_MARK,) + world.MARKS
    cells = [(o, s) for o in world.OBJECTS for s in styles] if cells is None else cells
    looks = []
    for i, (object_, style) in enumerate(cells):
        for k in range(per_pair):
            n = i * per_pair + k
            looks.append(world.Look(object_, world.COLOURS[n % len(world.COLOURS)], style, marks[(n // 3) % len(marks)]))
    return looks


def _character_rates(readings: Sequence[Reading], names: Sequence[str]) -> dict[str, float]:
    """Per character, the share of its images read as that character."""
    return {name: _share(r.character == name for r, n in zip(readings, names) if n == name)
            for name in dict.fromkeys(names)}


def _cell_rates(readings: Sequence[Reading], looks: Sequence[world.Look]) -> dict[tuple[str, str], float]:
    """Per (object, style), the share of its descriptions drawn with both right."""
    return {cell: _share(r.look is not None and (r.look.object, r.look.style) == cell
                         for r, look in zip(readings, looks) if (look.object, look.style) == cell)
            for cell in dict.fromkeys((look.object, look.style) for look in looks)}


def measure(pipeline, evaluator: Evaluator, *, per_character: int = 8, per_pair: int = 4,
            steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> CanvasQuality:
    prompts, names = character_prompts(per_character)
    looks = description_looks(per_pair)
    images = generate_images(pipeline, prompts + world.description_prompts(looks), seed=EVAL_SEED, steps=steps, guidance=guidance)
    readings = evaluator.read(images)
    drawn = readings[len(prompts):]
    return CanvasQuality(characters=_character_rates(readings[:len(prompts)], names),
                         attributes=attribute_accuracy(drawn, looks), style_on_object=_cell_rates(drawn, looks),
                         images=images)


def recheck(pipeline, evaluator: Evaluator, characters: Sequence[str], cells: Sequence[tuple[str, str]], *,
            count: int = RECHECK_IMAGES, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE
            ) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """The rates of `characters` and of (object, style) `cells` over `count` more images each, drawn as
    `measure` draws them but from `RECHECK_SEED`: the card's second look at borderline ones."""
    prompts, names = character_prompts(count, characters=characters)
    looks = description_looks(count, cells)
    if not prompts and not looks:
        return {}, {}
    images = generate_images(pipeline, prompts + world.description_prompts(looks), seed=RECHECK_SEED, steps=steps, guidance=guidance)
    readings = evaluator.read(images)
    return _character_rates(readings[:len(prompts)], names), _cell_rates(readings[len(prompts):], looks)


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
