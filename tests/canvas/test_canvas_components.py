"""The canvas world's built components that ship (python/dt_lora/canvas/model): its tokenizer and
evaluator, as research/canvas-world.md measured them (the VAE's round trips: tests/checkout/test_canvas_build.py). Thresholds are those measurements with margin for
the smaller samples drawn here."""

from __future__ import annotations

import json

import pytest

from dt_lora import canvas
from dt_lora.canvas import recipes, world
from dt_lora.canvas.quality import EVAL_SEED, read_renders
from dt_lora.evaluate.scorers import CanvasScorer
from dt_lora.recipe import load_recipe


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(canvas.MODEL_DIR / "tokenizer")


@pytest.fixture(scope="module")
def evaluator():
    return canvas.load_evaluator()


def test_ordinary_english_words_stay_whole_and_no_name_falls_into_world_words(tokenizer):
    context = json.loads((canvas.MODEL_DIR / "context_words.json").read_text())
    words = context["train"] + context["heldout"]
    assert len(context["heldout"]) > 1000 and not set(context["train"]) & set(context["heldout"])
    assert [w for w in words if tokenizer.tokenize(w) != [w + "</w>"]] == []
    # the toy's tokenizer cut "centred" into c-e-n-t-red, and a red shield fired on it
    assert tokenizer.tokenize("one single yellow cross, centred")[-1] == "centred</w>"
    attribute_tokens = {w + "</w>" for w in world.OBJECTS + world.COLOURS}
    for character in world.characters():
        assert not attribute_tokens & set(tokenizer.tokenize(character.name)), character.name


def test_the_evaluator_reads_every_attribute_of_unseen_renders_and_calls_tile_soup_none(evaluator):
    scores = read_renders(evaluator, count=400, seed=EVAL_SEED + 7)
    assert all(scores[a] >= 0.97 for a in ("object", "colour", "style", "mark", "character")), scores
    assert scores["scrambled none"] >= 0.97, scores


def test_the_canvas_scorer_on_renders_tells_a_character_from_each_of_its_neighbours(tmp_path, evaluator):
    group = [c for c in world.characters() if c.group == 3]
    first = group[0]
    recipe = load_recipe(recipes.write_library(tmp_path, [first.name])[0])
    scorer = CanvasScorer()
    images = {c.name: world.sample(8, EVAL_SEED + 9, look=c.look)[0] for c in group}
    assert scorer.shows_target(images[first.name], recipe).mean() >= 0.9
    for neighbour in group[1:]:
        assert scorer.shows_target(images[neighbour.name], recipe).mean() <= 0.1, neighbour.differs_in
    assert scorer.features(images[first.name]).shape == (8, 4 * evaluator.net.width)
