"""The heart of dt-lora: a shield trained with the shipped default recipe really shields, on the toy world.

For one shape and one colour: the target's prompts stop drawing it (≤ 10%, from ≥ 90%), held-out
paraphrases too (≤ 20%), every other shape keeps ≥ 90% of its base rate and every colour ≥ 95%.
Seeds of the measurement (1,000,000+) are never used in training.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dt_lora import toy
from dt_lora.recipe import load_recipe
from dt_lora.toy.quality import shield_report
from dt_lora.train import train_adapter

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
TARGETS = ("circle", "red")


@pytest.fixture(scope="module")
def pipeline():
    return toy.load()


@pytest.fixture(scope="module")
def base_reports(pipeline):
    return {target: shield_report(pipeline, toy.load_evaluator(), target) for target in TARGETS}


@pytest.fixture(scope="module", params=TARGETS)
def shielded(request, pipeline, tmp_path_factory):
    target = request.param
    folder = tmp_path_factory.mktemp(f"shield-{target}")
    result = train_adapter(load_recipe(ADAPTERS / f"toy-{target}.toml"), folder / f"{target}.safetensors",
                           cache_dir=folder / "cache", pipeline=pipeline, progress=False)
    return shield_report(pipeline, toy.load_evaluator(), target, adapters=[result.adapter])


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
