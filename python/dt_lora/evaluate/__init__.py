"""Does a shield work? Generate before and after with the same seeds, score, and write a report.

For each recipe, three prompt groups: the target's prompts, its paraphrases (never trained on) and
its anchors (neighbouring concepts that must stay intact). Each is drawn by up to three models with
identical seeds and sampler: `base` (unmodified), `shielded` (base + stacked adapters, or a baked
model) and, optionally, `negative prompt` (base, with the concept as negative prompt: what users
try without DT). Scorers:

  toy   the toy world's evaluator: does an image show the target shape/colour; is an anchor image
        the shape and colour its prompt asks for; distances between its feature vectors
  clip  CLIP zero-shot from a local folder: an image shows the target when the target's label beats
        every anchor prompt; an anchor image is correct when its own prompt wins; CLIP image
        embeddings for distances

Scorers are in `scorers.py`, report rendering in `report.py`, FID / IS / CLIP score on captions in
`quality.py`; this module draws and scores.

Under `accelerate launch`, every condition's images are drawn in shares by all processes and gathered
before scoring (distributed.py); the main process writes the report.

Image distance: 1 − cosine similarity of the scorer's features between the base and shielded image
of the same prompt and seed, next to the same distance between two seeds of the base model (how far
apart images of one prompt are anyway).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dt_lora import distributed
from dt_lora.base.generate import generate_images
from dt_lora.evaluate.quality import QUALITY_NAMES, QualityRequest
from dt_lora.evaluate.report import EvalReport, ReportSection, write_report
from dt_lora.evaluate.scorers import ClipScorer, Scorer, ToyScorer, choose_scorer
from dt_lora.recipe import Recipe
from dt_lora.toy import EVAL_SEED

GROUPS = ("target", "paraphrases", "anchors")


def _prompt_groups(recipes: Sequence[Recipe]) -> dict[str, dict[str, list[str]]]:
    """recipe → group → prompts. Anchors that another recipe targets are left out: with several
    shields stacked, "a red square" is a target of the red shield, not an anchor."""
    targeted = {p for r in recipes for p in r.target_prompts + r.target.paraphrases}
    groups = {}
    for recipe in recipes:
        prompts = {"target": recipe.target_prompts, "paraphrases": recipe.target.paraphrases,
                   "anchors": [p for p in recipe.anchor_prompts if p not in targeted]}
        groups[recipe.name] = prompts
    return groups


def evaluate_shields(
    base_pipeline,
    recipes: Sequence[Recipe],
    out_dir: str | Path,
    *,
    adapters: Sequence[Path] = (),
    shielded_pipeline=None,
    scorer: Scorer,
    negative_prompt: str | None = None,
    images_per_prompt: int = 2,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = EVAL_SEED,
    quality: QualityRequest | None = None,
    progress: bool = True,
    force: bool = False,
    attack=None,
) -> EvalReport:
    """Generate, score and write `report.json`, `report.md`, `report.html` and PNG grids to `out_dir`.

    The shielded model is `base_pipeline` with `adapters` stacked, or `shielded_pipeline` (a baked one).
    With `quality`, every condition also draws one image per caption and gets FID / IS / CLIP score.
    `force` accepts adapters trained on another base. With `attack` (attack.AttackSettings), the shield
    is also attacked (`attack.attack_shields`; the negative-prompt baseline too when `negative_prompt` is
    given) and the report gets an attack section.
    """
    from dt_lora.adapters import check_fits, pipeline_text_encoders, read_adapter

    # a damaged or misfitting adapter fails now, not after the base model has drawn everything
    check_fits([read_adapter(p) for p in adapters], base_pipeline.unet, force=force, sources=adapters,
               text_encoders=pipeline_text_encoders(base_pipeline))
    if not recipes:
        raise ValueError("nothing to evaluate: give at least one recipe")
    if bool(adapters) == (shielded_pipeline is not None):
        raise ValueError("give either adapters or a shielded (baked) pipeline, not both and not neither")
    if images_per_prompt < 2:
        raise ValueError("images_per_prompt must be at least 2 (the seed-to-seed distance needs two)")
    if quality is not None:
        quality.check()  # missing weights fail now, not after an hour of generating
    steps = steps or recipes[0].sampling.steps
    guidance = guidance if guidance is not None else recipes[0].sampling.guidance
    started = time.perf_counter()

    layout = _Layout(_prompt_groups(recipes), images_per_prompt)

    def draw(texts: list[str]) -> dict[str, np.ndarray]:
        return _draw_conditions(texts, base_pipeline, adapters, shielded_pipeline, negative_prompt, force=force,
                                seed=seed, steps=steps, guidance=guidance, progress=progress)

    drawn = draw(layout.prompts)
    shields = _score_shields(recipes, layout, drawn, scorer)
    distance = _image_distance(recipes, layout, drawn, scorer)
    settings = {"seed": seed, "images_per_prompt": images_per_prompt, "steps": steps, "guidance": guidance,
                "negative_prompt": negative_prompt, "adapters": [str(a) for a in adapters],
                "recipes": [r.name for r in recipes], "seconds": round(time.perf_counter() - started, 1)}
    report = EvalReport(scorer.name, list(drawn), shields, distance, settings)
    if quality is not None:
        report.quality = quality.measure(draw(quality.captions))
    if attack is not None:
        from dt_lora.evaluate.attack import attack_markdown, attack_shields

        report.attack = attack_shields(
            base_pipeline, recipes, out_dir, adapters=adapters, shielded_pipeline=shielded_pipeline, scorer=scorer,
            negative_prompts={r.name: negative_prompt for r in recipes} if negative_prompt else None,
            settings=attack, steps=steps, guidance=guidance, progress=progress, write_report=False)
        report.sections.append(ReportSection("Attack", attack_markdown(report.attack, level=3),
                                             report.attack.as_dict()))
    if distributed.is_main():
        write_report(report, out_dir, layout.groups, layout.position, drawn, images_per_prompt)
    return report


class _Layout:
    """Where each prompt's images sit in one drawing of every recipe's prompts: each distinct prompt is
    drawn once (recipes share anchors), and image j of prompt i is at i * images_per_prompt + j."""

    def __init__(self, groups: dict[str, dict[str, list[str]]], images_per_prompt: int):
        self.groups, self.images_per_prompt = groups, images_per_prompt
        self.position = {p: i for i, p in enumerate(dict.fromkeys(
            p for recipe_groups in groups.values() for group in recipe_groups.values() for p in group))}
        self.prompts = [p for p in self.position for _ in range(images_per_prompt)]

    def select(self, name: str, group: str) -> tuple[np.ndarray, list[str]]:
        """The indices of recipe `name`'s `group` images, and the prompt of each."""
        chosen, n = self.groups[name][group], self.images_per_prompt
        return (np.array([self.position[p] * n + j for p in chosen for j in range(n)], dtype=int),
                [p for p in chosen for _ in range(n)])


def _draw_conditions(texts: list[str], base_pipeline, adapters: Sequence[Path], shielded_pipeline,
                     negative_prompt: str | None, *, force: bool, **sampling) -> dict[str, np.ndarray]:
    """Condition ("base", "shielded", optionally "negative prompt") → images of `texts`, all drawn with the
    same seeds and sampler."""
    from dt_lora.adapters import load_adapters, unload_adapters

    def run(pipeline, negative=None):
        return generate_images(pipeline, texts, negative_prompt=negative, across_processes=True, **sampling)

    images = {"base": run(base_pipeline)}
    if adapters:
        load_adapters(base_pipeline, adapters, force=force)
        try:
            images["shielded"] = run(base_pipeline)
        finally:
            unload_adapters(base_pipeline)
    else:
        images["shielded"] = run(shielded_pipeline)
    if negative_prompt:
        images["negative prompt"] = run(base_pipeline, negative_prompt)
    return images


def _score_shields(recipes: Sequence[Recipe], layout: _Layout, drawn: dict[str, np.ndarray], scorer: Scorer) -> dict:
    """Per recipe and condition: the share of target and paraphrase images that show the target, and each
    anchor concept's share drawn correctly."""
    shields = {}
    for recipe in recipes:
        result: dict[str, dict] = {"target": {}, "paraphrases": {}, "preservation": {}}
        for condition, images in drawn.items():
            for group in ("target", "paraphrases"):
                index, _ = layout.select(recipe.name, group)
                result[group][condition] = float(scorer.shows_target(images[index], recipe).mean()) if len(index) else None
            index, anchor_prompts = layout.select(recipe.name, "anchors")
            result["preservation"][condition] = scorer.preservation(images[index], anchor_prompts) if len(index) else {}
        shields[recipe.name] = result
    return shields


def _image_distance(recipes: Sequence[Recipe], layout: _Layout, drawn: dict[str, np.ndarray], scorer: Scorer) -> dict:
    """1 − cosine similarity of anchor images, base against shielded (same prompt and seed) and base seed
    against base seed; empty when no recipe has anchors."""
    anchor_index = np.unique(np.concatenate([layout.select(r.name, "anchors")[0] for r in recipes]))
    if not len(anchor_index):
        return {}
    base_features = scorer.features(drawn["base"][anchor_index])
    shielded_features = scorer.features(drawn["shielded"][anchor_index])
    n = layout.images_per_prompt
    first, second = base_features[0::n], base_features[1::n]
    return {"shielded": float(1 - (base_features * shielded_features).sum(1).mean()),
            "seed_to_seed": float(1 - (first * second).sum(1).mean())}


__all__ = [
    "ClipScorer", "EVAL_SEED", "EvalReport", "QUALITY_NAMES", "QualityRequest", "ReportSection", "Scorer",
    "ToyScorer", "choose_scorer", "evaluate_shields", "write_report",
]
