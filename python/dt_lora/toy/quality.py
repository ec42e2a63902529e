"""The toy world's quality measurements: the numbers in the model card and in the tests.

Generation seeds start at 1_000_000, far from every seed the build uses, so these are always
generations from seeds not seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..generate import generate_images
from . import DEFAULT_GUIDANCE, DEFAULT_STEPS, world
from .evaluator import Evaluation, Evaluator

EVAL_SEED = 1_000_000


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
    from ..scramble import scramble_grid

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
        from ..adapters import load_adapters, unload_adapters

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
