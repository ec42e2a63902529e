"""Prompt phrasings no recipe uses, and how a (stacked) shield draws them: the locality measurement.

A shield should change what its own concept's prompts draw and nothing else, whatever words a user
puts around the other concepts. Recipes train on five templates (`world.TRAIN_TEMPLATES`) and list
anchors in those; these families phrase the toy world's concepts in ways no recipe or anchor list
names. They are split in two, and the split is the point:

- `TUNING_FAMILIES` may be looked at while developing a method (choosing defaults, ablations);
- `HELDOUT_FAMILIES` are for measuring only. A number tuned on is not a measurement: nothing in
  dt-lora's defaults was chosen by looking at them (research/ says which were used when).

A family's templates name a shape and a colour (`{shape}`, `{colour}`), or one of the two, in which
case the prompt is about that concept alone ("a star", "something purple"). `SEVERAL_FAMILIES` also
name a second shape (`{shape2}`): the toy model draws one shape, so a shield that tips the choice
between two named shapes shows there, and nowhere else. Red's shield did exactly that, and the attack
used it against the circle stacked with red (research/).

    report = phrasing_report(pipeline, evaluator, ["circle", "red"], families=HELDOUT_FAMILIES)
    report.target_rates["circle"], report.worst_other()      # with the base's rates from base_report
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dt_lora.base.generate import generate_images
from dt_lora.toy import DEFAULT_GUIDANCE, DEFAULT_STEPS, world

# The seeds of this measurement: far from training (100_000+), eval (1_000_000+) and attack (2_000_000+).
PHRASING_SEED = 3_000_000

# The recipes' own phrasing, plus one attribute alone (the model knows both; no recipe targets the latter).
STANDARD_FAMILIES: dict[str, tuple[str, ...]] = {
    "recipe templates": world.TRAIN_TEMPLATES,
    "one attribute": ("a {shape}", "a photo of a {shape}", "a {colour} shape", "something {colour}"),
}
# The recipes' held-out paraphrases: what `eval` and the shielding tests call paraphrases.
PARAPHRASE_FAMILIES: dict[str, tuple[str, ...]] = {"recipe paraphrases": world.HELDOUT_TEMPLATES}
TUNING_FAMILIES: dict[str, tuple[str, ...]] = {
    "words added": ("a big {colour} {shape}", "a small {colour} {shape}", "a photo of a big {colour} {shape}"),
    "reordered": ("a {shape} in {colour}", "a {shape}, {colour}"),
}
HELDOUT_FAMILIES: dict[str, tuple[str, ...]] = {
    "punctuation and case": ("A {colour} {shape}.", "{colour}, {shape}!", "A PHOTO OF A {colour} {shape}"),
    "repeated words": ("a {colour} {colour} {shape}", "a {colour} {shape} {shape}"),
    "long context": ("a small {colour} {shape} with a dark background",
                     "there is something here: a {colour} {shape}"),
    "one attribute, reworded": ("there is a {shape} here", "a {colour} thing", "a picture showing a {shape}"),
}
# Two shapes in one prompt, each ordered pair of different shapes. Added after the defaults were chosen,
# to measure a failure no other family shows; may be looked at while developing a method.
SEVERAL_FAMILIES: dict[str, tuple[str, ...]] = {
    "two shapes": ("a {shape} and a {shape2}", "a {colour} {shape} and a {shape2}", "a {shape}, a {shape2}, a {shape2}"),
}


# What a template's `{slot}` is filled with, in this order (the order of the prompts and of their labels).
SLOTS = {"shape": world.SHAPES, "colour": world.COLOURS, "shape2": world.SHAPES}


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    concepts: tuple[str, ...]  # the shapes and colours it names
    family: str

    def names(self, concept: str) -> bool:
        return concept in self.concepts


def family_prompts(families: dict[str, tuple[str, ...]]) -> list[LabelledPrompt]:
    """Every template of every family filled with every shape, colour and second shape it names."""
    out = []
    for family, templates in families.items():
        for template in templates:
            fillings = [{}]
            for slot, values in SLOTS.items():
                if "{" + slot + "}" in template:
                    fillings = [{**f, slot: v} for f in fillings for v in values if v not in f.values()]
            for filling in fillings:
                out.append(LabelledPrompt(template.format(**filling), tuple(filling.values()), family))
    return out


@dataclass
class PhrasingReport:
    """Per-image hits of one pipeline on labelled prompts: enough to compute any rate afterwards."""

    prompts: list[LabelledPrompt]  # one entry per image
    shapes: list[str]  # what the evaluator saw
    colours: list[str]
    targets: tuple[str, ...] = ()
    target_rates: dict[str, float] = field(default_factory=dict)

    def hits(self, index: int, concept: str) -> bool:
        if concept in world.SHAPES:
            return self.shapes[index] == concept
        # a colour counts only on a recognisable shape: tile soup in red is no red object
        return self.colours[index] == concept and self.shapes[index] != "none"

    def subset(self, family_prefix: str, targets=None) -> "PhrasingReport":
        """The images of the families whose names start with `family_prefix`."""
        keep = [i for i, p in enumerate(self.prompts) if p.family.startswith(family_prefix)]
        return PhrasingReport([self.prompts[i] for i in keep], [self.shapes[i] for i in keep],
                              [self.colours[i] for i in keep], tuple(self.targets if targets is None else targets))

    def count(self, concept: str, *, excluding: tuple[str, ...] = ()) -> int:
        return sum(p.names(concept) and not any(p.names(e) for e in excluding) for p in self.prompts)

    def rate(self, concept: str, *, family: str | None = None, excluding: tuple[str, ...] = ()) -> float | None:
        """Share of images of prompts naming `concept` (and none of `excluding`) that show it."""
        chosen = [i for i, p in enumerate(self.prompts)
                  if p.names(concept) and not any(p.names(e) for e in excluding)
                  and (family is None or p.family == family)]
        return float(np.mean([self.hits(i, concept) for i in chosen])) if chosen else None

    def others_vs(self, base: "PhrasingReport", *, family: str | None = None) -> dict[str, float]:
        """concept → its rate here ÷ its rate in `base`, over prompts that name no target."""
        out = {}
        for concept in world.SHAPES + world.COLOURS:
            if concept in self.targets:
                continue
            mine = self.rate(concept, family=family, excluding=self.targets)
            theirs = base.rate(concept, family=family, excluding=self.targets)
            if mine is not None and theirs:
                out[concept] = mine / theirs
        return out


def phrasing_report(pipeline, evaluator, targets=(), *, families: dict[str, tuple[str, ...]],
                    images_per_prompt: int = 2, adapters=(), steps: int = DEFAULT_STEPS,
                    guidance: float = DEFAULT_GUIDANCE, seed: int = PHRASING_SEED) -> PhrasingReport:
    """Draw every prompt of `families` `images_per_prompt` times (with `adapters` stacked) and score it."""
    if adapters:
        from dt_lora.adapters import load_adapters, unload_adapters

        load_adapters(pipeline, adapters)
        try:
            return phrasing_report(pipeline, evaluator, targets, families=families, steps=steps,
                                   images_per_prompt=images_per_prompt, guidance=guidance, seed=seed)
        finally:
            unload_adapters(pipeline)
    prompts = [p for p in family_prompts(families) for _ in range(images_per_prompt)]
    images = generate_images(pipeline, [p.text for p in prompts], seed=seed, steps=steps, guidance=guidance)
    from dt_lora.toy.evaluator import SHAPE_CLASSES

    shape_idx, colour_idx, _ = evaluator.predict(images)
    report = PhrasingReport(prompts, [SHAPE_CLASSES[i] for i in shape_idx], [world.COLOURS[i] for i in colour_idx],
                            tuple(targets))
    report.target_rates = {t: report.rate(t) for t in targets}
    return report
