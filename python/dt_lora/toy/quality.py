"""The toy world's measurements: the numbers in the model card, `dt-lora eval`'s toy scorer and the tests.

What the evaluator's verdicts mean (`target_concept`, `shows_concept`, `drawn_rates`: used by
`dt_lora.evaluate.ToyScorer`), the model's quality (`measure`), a shield's effect (`shield_report`)
and the ControlNet's steering (`measure_control`). Generation seeds start at `EVAL_SEED`, far from
every seed the build uses, so these are always generations from seeds not seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dt_lora.base.generate import generate_images
from dt_lora.toy import DEFAULT_GUIDANCE, DEFAULT_STEPS, EVAL_SEED, world
from dt_lora.toy.controlnet import generate_controlled
from dt_lora.toy.evaluator import Evaluation, Evaluator, named_concepts


def target_concept(prompts: Sequence[str]) -> str | None:
    """The toy shape or colour that every one of `prompts` names; None if there is none."""
    for concept in world.SHAPES + world.COLOURS:
        if all(concept in p.split() for p in prompts):
            return concept
    return None


def shows_concept(evaluator: Evaluator, images, concept: str) -> np.ndarray:
    """Per image: does it show `concept`? A colour counts only on a recognisable shape: tile soup of
    red is no red object (the rule `Evaluator.evaluate`'s colour rates follow too)."""
    shapes, colours, _ = evaluator.predict(images)
    if concept in world.SHAPES:
        return shapes == world.SHAPES.index(concept)
    if concept in world.COLOURS:
        return (colours == world.COLOURS.index(concept)) & (shapes != len(world.SHAPES))
    raise ValueError(f"unknown toy concept {concept!r}; choose from {world.SHAPES + world.COLOURS}")


def drawn_rates(evaluator: Evaluator, images, prompts: Sequence[str]) -> dict[str, float]:
    """Per shape and colour named in `prompts`: the share of its images that show it."""
    evaluation = evaluator.evaluate(images, prompts)
    return {**evaluation.shape_rates, **evaluation.colour_rates}


def concept_prompts(per_combination: int, templates=world.TRAIN_TEMPLATES) -> list[str]:
    """`per_combination` prompts for every (shape, colour), cycling through `templates`."""
    return [
        world.prompt_for(shape, colour, templates[k % len(templates)])
        for shape in world.SHAPES
        for colour in world.COLOURS
        for k in range(per_combination)
    ]


@dataclass
class WorldQuality:
    generations: Evaluation
    images: np.ndarray
    scrambled_none_rate: float
    clean_none_rate: float

    def table(self) -> str:
        lines = ["| concept | rate |", "|---|---|"]
        lines += [f"| shape: {k} | {v:.3f} |" for k, v in self.generations.shape_rates.items()]
        lines += [f"| colour: {k} | {v:.3f} |" for k, v in self.generations.colour_rates.items()]
        lines += [f"| Scrambled Grid renders (grid 4) classified none | {self.scrambled_none_rate:.3f} |",
                  f"| clean renders classified none | {self.clean_none_rate:.3f} |"]
        return "\n".join(lines)


def measure(pipeline, evaluator: Evaluator, *, per_combination: int = 8, renders: int = 500,
            steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> WorldQuality:
    from dt_lora.scramble import scramble_grid

    prompts = concept_prompts(per_combination)
    images = generate_images(pipeline, prompts, seed=EVAL_SEED, steps=steps, guidance=guidance)
    clean, _ = world.sample(renders, EVAL_SEED)
    scrambled = scramble_grid(clean, 4, EVAL_SEED, layout="NHWC")
    return WorldQuality(
        generations=evaluator.evaluate(images, prompts),
        images=images,
        scrambled_none_rate=evaluator.evaluate(scrambled, [""] * renders).none_rate,
        clean_none_rate=evaluator.evaluate(clean, [""] * renders).none_rate,
    )


@dataclass
class ShieldReport:
    """How a (possibly shielded) pipeline draws one target concept and everything else."""

    target: str
    target_rate: float  # share of the target's prompts (training templates) drawn as the target
    paraphrase_rate: float  # the same on held-out templates
    shape_rates: dict[str, float]  # every other prompt, per shape
    colour_rates: dict[str, float]  # every other prompt, per colour

    def as_dict(self) -> dict:
        return {"target": self.target, "target_rate": self.target_rate, "paraphrase_rate": self.paraphrase_rate,
                "shapes": self.shape_rates, "colours": self.colour_rates}


def _names(prompt: str, concept: str) -> bool:
    return concept in prompt.split()


def shield_report(pipeline, evaluator: Evaluator, target: str, *, adapters=(), per_combination: int = 4,
                  steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> ShieldReport:
    """How `pipeline` (with `adapters` stacked, if any) draws `target` and everything else."""
    return shield_reports(pipeline, evaluator, [target], adapters=adapters, per_combination=per_combination,
                          steps=steps, guidance=guidance)[target]


def shield_reports(pipeline, evaluator: Evaluator, targets, *, adapters=(), per_combination: int = 4,
                   steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> dict[str, ShieldReport]:
    """Generate every (shape, colour) pair and each target's held-out paraphrases, and score them.

    `adapters` (paths) are stacked on the pipeline for the measurement and removed afterwards.
    A target's rate counts images classified as that concept; the other concepts' rates count only
    prompts that name none of the targets, so a shielded circle does not lower "red".
    """
    if adapters:
        from dt_lora.adapters import load_adapters, unload_adapters

        load_adapters(pipeline, adapters)
        try:
            return shield_reports(pipeline, evaluator, targets, per_combination=per_combination,
                                  steps=steps, guidance=guidance)
        finally:
            unload_adapters(pipeline)

    targets = list(targets)
    for target in targets:
        if target not in world.SHAPES + world.COLOURS:
            raise ValueError(f"unknown toy concept {target!r}; choose from {world.SHAPES + world.COLOURS}")
    prompts = concept_prompts(per_combination)
    heldout = concept_prompts(per_combination, world.HELDOUT_TEMPLATES)
    paraphrases = [p for p in heldout if any(_names(p, t) for t in targets)]
    images = generate_images(pipeline, prompts + paraphrases, seed=EVAL_SEED, steps=steps, guidance=guidance)
    paraphrase_images = images[len(prompts):]

    def rate_of(target: str, indices: list[int], pool: np.ndarray, texts: list[str]) -> float:
        evaluation = evaluator.evaluate(pool[indices], [texts[i] for i in indices])
        return (evaluation.shape_rates if target in world.SHAPES else evaluation.colour_rates)[target]

    off_target = [i for i, p in enumerate(prompts) if not any(_names(p, t) for t in targets)]
    rest = evaluator.evaluate(images[off_target], [prompts[i] for i in off_target])
    reports = {}
    for target in targets:
        on_target = [i for i, p in enumerate(prompts) if _names(p, target)]
        on_paraphrase = [i for i, p in enumerate(paraphrases) if _names(p, target)]
        reports[target] = ShieldReport(target, rate_of(target, on_target, images, prompts),
                                       rate_of(target, on_paraphrase, paraphrase_images, paraphrases),
                                       rest.shape_rates, rest.colour_rates)
    return reports


# --- the ControlNet: does it steer where the object goes, and leave what it is to the prompt? ---

# An object pixel differs from the background (the border's median colour) by more than this (of 255).
OBJECT_THRESHOLD = 48.0


def object_masks(images: np.ndarray) -> np.ndarray:
    """Which pixels of each uint8 NHWC image belong to the object: those far from the border's median
    colour (every toy object lies inside the border, on a flat grey background)."""
    pixels = images.astype(np.float32)
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None, :]
    return np.linalg.norm(pixels - background, axis=-1) > OBJECT_THRESHOLD


def centroids(images: np.ndarray) -> np.ndarray:
    """(x, y) centroid of each image's object in `Scene.centre` coordinates; the image centre if none."""
    masks = object_masks(images)
    coords = np.arange(images.shape[2]) + 0.5
    counts = masks.sum(axis=(1, 2))
    xs = (masks * coords[None, None, :]).sum(axis=(1, 2))
    ys = (masks * coords[None, :, None]).sum(axis=(1, 2))
    middle = images.shape[2] / 2
    return np.stack([np.where(counts > 0, xs / np.maximum(counts, 1), middle),
                     np.where(counts > 0, ys / np.maximum(counts, 1), middle)], axis=1)


def centroid_error(images: np.ndarray, scenes: Sequence[world.Scene]) -> float:
    """Mean distance in pixels between each image's object centroid and its scene's centre."""
    wanted = np.array([scene.centre for scene in scenes])
    return float(np.linalg.norm(centroids(images) - wanted, axis=1).mean())


def control_scenes(per_combination: int) -> tuple[list[str], list[world.Scene]]:
    """The quality prompts (`concept_prompts`) and, for each, a scene of its shape and colour whose
    location map will steer it; seeded from EVAL_SEED, so never a training scene."""
    rng = np.random.default_rng(EVAL_SEED)
    prompts = concept_prompts(per_combination)
    return prompts, [world.random_scene(rng, *named_concepts(p)) for p in prompts]


@dataclass
class ControlQuality:
    controlled: Evaluation
    uncontrolled: Evaluation
    controlled_error: float  # mean centroid error (pixels) of generations under their location maps
    uncontrolled_error: float  # the same scenes' centres against generations without control

    def summary(self) -> dict:
        return {"centroid_error": {"controlled": self.controlled_error, "uncontrolled": self.uncontrolled_error},
                "controlled": self.controlled.summary(), "uncontrolled": self.uncontrolled.summary()}


def measure_control(pipeline, controlnet, evaluator: Evaluator, *, per_combination: int = 4,
                    steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> ControlQuality:
    """Generate every (shape, colour) pair with and without its location map, from the same seeds."""
    prompts, scenes = control_scenes(per_combination)
    maps = world.location_maps([s.centre for s in scenes], [s.radius for s in scenes])
    controlled = generate_controlled(pipeline, controlnet, prompts, maps, seed=EVAL_SEED, steps=steps,
                                     guidance=guidance)
    uncontrolled = generate_images(pipeline, prompts, seed=EVAL_SEED, steps=steps, guidance=guidance)
    return ControlQuality(evaluator.evaluate(controlled, prompts), evaluator.evaluate(uncontrolled, prompts),
                          centroid_error(controlled, scenes), centroid_error(uncontrolled, scenes))
