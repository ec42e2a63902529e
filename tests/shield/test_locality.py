"""Text-local shields (locality.py): the directions, and a trained shield that keeps to them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dt_lora import toy
from dt_lora.adapters import read_adapter
from dt_lora.base.family import encode_prompts
from dt_lora.recipe import RecipeError, load_recipe
from dt_lora.shield.locality import concept_words, generic_prompts, text_local_directions
from dt_lora.shield.train import train_adapter

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"


def test_directions_find_what_only_the_target_uses():
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0]
    retained = torch.randn(400, 3, 12, generator=generator) @ basis[:, :12].T  # lives in 12 of 16 dims
    secret = basis[:, 14]
    target = torch.randn(50, 3, 12, generator=generator) @ basis[:, :12].T + 5 * secret
    directions, ratios = text_local_directions(target, retained, 2)
    assert directions.shape == (2, 16) and ratios[0] > 1e3 * ratios[1].clamp(min=1)
    first = directions[0] / directions[0].norm()
    assert abs(float(first @ secret)) > 0.99
    # scaled so the retained prompts' mean squared response is 1 (up to the ridge)
    response = (retained.reshape(-1, 16) @ directions.T).pow(2).mean(0)
    assert response[1] == pytest.approx(1.0, rel=1e-2)


def test_the_weakest_target_strength_gives_every_target_the_same_response_floor():
    from dt_lora.shield.locality import LOWEST_TARGET_STRENGTH, TARGET_RESPONSE_FLOOR, weakest_target_strength

    directions = torch.eye(2, 8)  # responses: the first two coordinates
    for rms in (12.0, 30.0):  # a target that answers 2.5 × as strongly is degenerated down to 1/2.5 the strength
        embeds = torch.zeros(5, 3, 8)
        embeds[..., 0] = rms  # mean over both directions of the squared response: rms² / 2
        embeds[..., 1] = rms
        assert weakest_target_strength(directions, embeds) == pytest.approx(TARGET_RESPONSE_FLOOR / rms)
    assert weakest_target_strength(directions, torch.ones(5, 3, 8)) == 1.0  # a weak target: trained at 1 only
    assert weakest_target_strength(directions, torch.full((5, 3, 8), 1e4)) == LOWEST_TARGET_STRENGTH


def test_generic_prompts_leave_out_the_concept_and_repeat():
    tokenizer = toy.load().tokenizer
    prompts = generic_prompts(tokenizer, {"circle"}, count=300)
    assert prompts == generic_prompts(tokenizer, {"circle"}, count=300)
    assert len(prompts) == 300 and all(1 <= len(p.split()) <= 8 for p in prompts)
    assert not any("circle" in p.split() for p in prompts)
    assert any("square" in p.split() for p in prompts)


def test_concept_words_are_what_no_anchor_says():
    assert concept_words(["a red circle", "a photo of a red circle"], ["a red square", "a photo of a star"]) == {"circle"}


def test_text_local_needs_cross_attention_keys_and_values():
    with pytest.raises(RecipeError, match="lora.targets"):
        load_recipe(ADAPTERS / "toy-circle.toml", {"lora.targets": "to_q,to_k"})
    with pytest.raises(RecipeError, match="lora.rank"):  # the toy text encoder is 64 wide; refused before any work
        train_adapter(load_recipe(ADAPTERS / "toy-circle.toml", {"lora.rank": "65"}), "unused.safetensors",
                      pipeline=toy.load(), progress=False)


def test_a_text_local_shield_moves_only_its_concepts_prompts(tmp_path):
    pipeline = toy.load()
    recipe = load_recipe(ADAPTERS / "toy-circle.toml", {
        "target.images": "8", "anchors.images": "8", "train.steps": "20", "train.batch_size": "4",
        "sampling.steps": "4", "train.target_scale_min": "auto"})
    assert recipe.lora.text_local  # the default
    result = train_adapter(recipe, tmp_path / "c.safetensors", cache_dir=tmp_path / "cache", pipeline=pipeline,
                           progress=False)
    adapter = read_adapter(result.adapter)
    concept = adapter.concepts[0]
    layers = [k[: -len(".lora_A.weight")] for k in adapter.weights if k.endswith(".lora_A.weight")]
    assert layers and all(layer.endswith(("attn2.to_k", "attn2.to_v")) for layer in layers)
    first_a = adapter.weights[f"{layers[0]}.lora_A.weight"]
    for layer in layers:  # lora_A stayed the fixed directions, lora_B learnt
        torch.testing.assert_close(adapter.weights[f"{layer}.lora_A.weight"], first_a)
        assert adapter.weights[f"{layer}.lora_B.weight"].abs().max() > 0

    def response(prompts):  # mean ‖A·x‖² over token positions
        x = encode_prompts(pipeline, prompts).embeds.reshape(-1, first_a.shape[1])
        return float((x @ first_a.T).pow(2).sum(1).mean())

    others = ["a green star", "something purple", "a big yellow cross with a dark background", ""]
    assert response(recipe.target.paraphrases) > 100 * response(others)

    # train.target_scale_min "auto": down to where the recipe's prompts answer with TARGET_RESPONSE_FLOOR × rms
    from dt_lora.shield.locality import TARGET_RESPONSE_FLOOR

    lowest = concept["train"]["target_scale_min"]
    floor = lowest * response(recipe.target_prompts) ** 0.5 / 2 ** 0.5  # the rms over both directions
    assert 0.1 < lowest < 0.5 and floor == pytest.approx(TARGET_RESPONSE_FLOOR, rel=1e-3)


def test_prompt_contexts_put_each_target_image_s_prompt_in_random_words(tmp_path):
    from dt_lora.shield.locality import prompts_in_context, shield_directions

    pipeline = toy.load()
    recipe = load_recipe(ADAPTERS / "toy-circle.toml", {
        "target.images": "8", "anchors.images": "8", "train.steps": "4", "train.batch_size": "4",
        "sampling.steps": "4", "train.prompt_contexts": "2"})
    prompts = prompts_in_context(recipe, pipeline.tokenizer)
    assert prompts == prompts_in_context(recipe, pipeline.tokenizer) and len(prompts) == 16  # 2 copies × 8 images
    before = after = 0
    for j, prompt in enumerate(prompts):
        own = recipe.target_prompts[j % 8]  # copy c of image i is item c·8 + i
        assert own in prompt and prompt != own
        context = prompt.replace(own, " ").split()
        assert not set(context) & concept_words(recipe.target_prompts, recipe.anchor_prompts)
        before += prompt.endswith(own)
        after += prompt.startswith(own)
    assert before and after
    plain = load_recipe(ADAPTERS / "toy-circle.toml", {"target.images": "8"})
    assert not torch.allclose(shield_directions(pipeline, recipe), shield_directions(pipeline, plain))
    result = train_adapter(recipe, tmp_path / "c.safetensors", cache_dir=tmp_path / "cache", pipeline=pipeline,
                           progress=False)
    assert read_adapter(result.adapter).concepts[0]["train"]["prompt_contexts"] == 2
    with pytest.raises(RecipeError, match="train.prompt_contexts"):
        load_recipe(ADAPTERS / "toy-circle.toml", {"train.prompt_contexts": "-1"})


def test_the_dilution_table_sets_found_prompts_against_the_kept_ones():
    from research.dilution import dilution

    recipe = load_recipe(ADAPTERS / "toy-circle.toml")
    found = [{"source": "a blue circle", "found": "square square triangle green square a blue circle", "broken": True},
             {"source": "a red circle", "found": "a red circle", "broken": False}]
    table = dilution(toy.load(), recipe, found)
    assert table["retained max"] < table["target prompts"] / 3  # the circle's directions tell them apart
    assert table["after 4-8 neighbour words"] < table["after 1-8 vocabulary words"] < table["target prompts"]
    assert table["found / source, held"] == pytest.approx(1.0) and table["found / source, broken"] < 0.9
    assert table["retained answering most"][0][1] == table["retained max"]
    kept_p99, kept_max = table["along the target's direction: retained p99 / max"]
    assert kept_p99 < kept_max < table["along the target's direction: target prompts"] / 3
    assert table["along the target's direction: found above the retained max"] >= 1  # "a red circle" is a target


@pytest.mark.parametrize("colours, shapes, warned", [
    (("red", "green", "yellow", "purple"), ("square", "circle", "star"), "blue"),  # no other blue thing
    (("red", "green", "blue", "yellow", "purple"), ("circle", "star"), "square"),  # no square in another colour
], ids=["no-blue-anchor", "no-square-anchor"])
def test_the_words_a_shield_keys_on_are_said_and_a_word_it_answers_alone_is_warned(tmp_path, colours, shapes, warned):
    from dt_lora.shield.locality import describe_key_words
    from research.key_words import blue_square_key_words

    recipe, shares = blue_square_key_words(toy.load(), tmp_path, colours, shapes)
    line, warnings = describe_key_words(recipe, shares)
    assert f"keys on {', '.join(repr(w) for w in sorted(shares))}" in line and warned in shares
    assert [w for w in shares if any(f"prompts with {w!r}" in text for text in warnings)] == [warned]
    assert shares["drawing"] < 0.2  # a filler word of the target's alone does not make the shield fire
