"""The heart of dt-lora: a shield trained with the shipped default recipe really shields, on the toy world.

For one shape and one colour: the target's prompts stop drawing it (≤ 10%, from ≥ 90%), held-out
paraphrases too (≤ 20%), every other shape keeps ≥ 90% of its base rate and every colour ≥ 95%.
Stacked, both stay shielded within 5 points of their single rate and the rest keeps ≥ 90% of base.
Four stacked (two shapes, two colours) meet the locality bar on the recipes' phrasings and on phrasings
no recipe uses and no default was tuned on (`toy.phrasings.HELDOUT_FAMILIES`): every target ≤ 0.05, its
paraphrases ≤ 0.10, every concept no shield names ≥ 0.95 × base.
Seeds of the measurement (1,000,000+ and 3,000,000+) are never used in training.
"""

from __future__ import annotations

import pytest
from helpers.lora import SHIELDED, STACKED

from dt_lora import toy
from dt_lora.toy import phrasings
from dt_lora.toy.quality import shield_report, shield_reports

# every test draws hundreds of images, most with the shipped shields
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_reports(toy_pipeline):
    return {target: shield_report(toy_pipeline, toy.load_evaluator(), target) for target in SHIELDED}


@pytest.fixture(scope="module")
def single_reports(toy_pipeline, toy_shields):
    return {target: shield_report(toy_pipeline, toy.load_evaluator(), target, adapters=[toy_shields[target]])
            for target in SHIELDED}


@pytest.fixture(params=SHIELDED)
def shielded(request, single_reports):
    return single_reports[request.param]


def test_base_model_draws_the_target(base_reports):
    for target, report in base_reports.items():
        assert report.target_rate >= 0.90, target


def test_target_is_shielded(shielded):
    assert shielded.target_rate <= 0.10


def test_held_out_paraphrases_are_shielded(shielded):
    assert shielded.paraphrase_rate <= 0.20


def test_other_shapes_are_preserved(shielded, base_reports):
    base = base_reports[shielded.target]
    for shape, rate in shielded.shape_rates.items():
        if shape != shielded.target:
            assert rate >= 0.90 * base.shape_rates[shape], (shape, rate, base.shape_rates[shape])


def test_colours_are_preserved(shielded, base_reports):
    base = base_reports[shielded.target]
    for colour, rate in shielded.colour_rates.items():
        if colour != shielded.target:
            assert rate >= 0.95 * base.colour_rates[colour], (colour, rate, base.colour_rates[colour])


def test_stacked_shields_hold_and_keep_the_rest(toy_pipeline, toy_shields, single_reports):
    evaluator = toy.load_evaluator()
    stacked = shield_reports(toy_pipeline, evaluator, SHIELDED, adapters=[toy_shields[t] for t in SHIELDED])
    base = shield_reports(toy_pipeline, evaluator, SHIELDED)[SHIELDED[0]]  # rates of prompts naming neither
    for target in SHIELDED:
        assert stacked[target].target_rate <= single_reports[target].target_rate + 0.05, target
        assert stacked[target].paraphrase_rate <= single_reports[target].paraphrase_rate + 0.05, target
    rest = stacked[SHIELDED[0]]
    for concept, rate in {**rest.shape_rates, **rest.colour_rates}.items():
        expected = {**base.shape_rates, **base.colour_rates}[concept]
        assert rate >= 0.90 * expected, (concept, rate, expected)


def test_four_stacked_shields_keep_everything_else(toy_pipeline, toy_shields):
    evaluator = toy.load_evaluator()
    groups = {"standard": phrasings.STANDARD_FAMILIES, "paraphrases": phrasings.PARAPHRASE_FAMILIES,
              "heldout": phrasings.HELDOUT_FAMILIES}
    families = {f"{g}/{name}": templates for g, group in groups.items() for name, templates in group.items()}
    base = phrasings.phrasing_report(toy_pipeline, evaluator, families=families)
    stacked = phrasings.phrasing_report(toy_pipeline, evaluator, STACKED, families=families,
                                        adapters=[toy_shields[t] for t in STACKED])
    for target in STACKED:
        assert stacked.subset("standard/").rate(target) <= 0.05, target
        assert stacked.subset("paraphrases/").rate(target) <= 0.10, target
    for group in ("standard/", "heldout/"):
        mine, theirs = stacked.subset(group), base.subset(group, STACKED)
        others = mine.others_vs(theirs)
        assert len(others) == 6  # triangle, cross, star, green, yellow, purple
        assert all(mine.count(c, excluding=STACKED) >= 20 for c in others)
        for concept, ratio in others.items():
            assert ratio >= 0.95, (group, concept, ratio)


def test_stacking_picture_shows_base_and_stack_per_family(toy_shields, tmp_path):
    """`python -m research.stacking ... --picture`: one labelled row per family prompt, base | stacked."""
    from PIL import Image

    from research.stacking import GROUPS, picture

    path = tmp_path / "stack.png"
    picture([toy_shields["circle"], toy_shields["red"]], path, seeds=2)
    families = sum(len(families) for families in GROUPS.values())
    image = Image.open(path)
    rows = (image.height - 20) // (32 * 3 + 4)  # 32 px images drawn at 3×, 4 px between rows
    assert families < rows <= families + 4  # every family without a target, and up to four naming one
    assert image.width == 260 + 2 * 2 * 32 * 3  # label column, then 2 seeds of the base and 2 stacked


def test_stacking_measures_merged_and_baked_shields_as_the_stack(toy_shields, monkeypatch):
    """`python -m research.stacking ... --merge-rank R --bake`, on one small family: merged
    exactly and baked, the two shields draw what they draw stacked."""
    from research import stacking

    monkeypatch.setattr(stacking, "GROUPS", {"standard": {"one attribute": ("a {shape}", "a {colour} shape")}})
    result = stacking.run([toy_shields["circle"], toy_shields["red"]], merge_rank=4, bake=True,
                          progress=False)
    rows = {r["shields"]: r["standard"] for r in result["rows"]}
    assert list(rows) == ["circle", "circle + red", "all 2 merged exactly", "all 2 merged to rank 4", "all 2 baked"]
    for label in ("all 2 merged exactly", "all 2 baked"):
        assert rows[label]["targets"] == pytest.approx(rows["circle + red"]["targets"], abs=0.1), label
        assert rows[label]["worst_other"] >= 0.9, label
