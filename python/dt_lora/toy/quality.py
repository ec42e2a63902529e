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
    """Generate every (shape, colour) pair and the target's held-out paraphrases, and score them.

    `adapters` (paths) are stacked on the pipeline for the measurement and removed afterwards.
    The target's rate counts images classified as the target concept; for the other concepts only
    prompts that do not name the target count, so a shielded circle does not lower "red".
    """
    if adapters:
        from ..adapters import load_adapters, unload_adapters

        load_adapters(pipeline, adapters)
        try:
            return shield_report(pipeline, evaluator, target, per_combination=per_combination,
                                 steps=steps, guidance=guidance)
        finally:
            unload_adapters(pipeline)

    is_shape = target in world.SHAPES
    if not is_shape and target not in world.COLOURS:
        raise ValueError(f"unknown toy concept {target!r}; choose from {world.SHAPES + world.COLOURS}")
    prompts = concept_prompts(per_combination)
    paraphrases = [p for p in concept_prompts(per_combination, world.HELDOUT_TEMPLATES) if _names(p, target)]
    images = generate_images(pipeline, prompts + paraphrases, seed=EVAL_SEED, steps=steps, guidance=guidance)

    def target_rate(evaluation: Evaluation) -> float:
        rates = evaluation.shape_rates if is_shape else evaluation.colour_rates
        return rates[target]

    on_target = [i for i, p in enumerate(prompts) if _names(p, target)]
    off_target = [i for i, p in enumerate(prompts) if not _names(p, target)]
    target_eval = evaluator.evaluate(images[on_target], [prompts[i] for i in on_target])
    rest = evaluator.evaluate(images[off_target], [prompts[i] for i in off_target])
    paraphrase_eval = evaluator.evaluate(images[len(prompts):], paraphrases)
    return ShieldReport(target, target_rate(target_eval), target_rate(paraphrase_eval),
                        rest.shape_rates, rest.colour_rates)
