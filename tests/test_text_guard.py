"""research.text_guard: a text-encoder guard keeps a concept's response in context and other prompts' output."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dt_lora.recipe import load_recipe
from dt_lora.recipes import recipe_path
from dt_lora.research import text_guard


@pytest.fixture(scope="module")
def red_guard(toy_pipeline, tmp_path_factory):
    recipe = load_recipe(recipe_path("toy-red"))
    settings = text_guard.GuardSettings(rounds=1, steps=80, attack_steps=8)
    weights = text_guard.train_guard(toy_pipeline, recipe, settings, log=lambda line: None)
    path = text_guard.write_guard(tmp_path_factory.mktemp("guard") / "red-guard.safetensors", weights, recipe, settings)
    return recipe, path


def test_a_guard_keeps_the_response_the_text_attack_takes_away(toy_pipeline, red_guard):
    from dt_lora.attack import allowed_tokens
    from dt_lora.locality import concept_words, shield_directions

    recipe, path = red_guard
    base = toy_pipeline.text_encoder
    guarded = copy.deepcopy(base)
    text_guard.apply_guards(guarded, [path])
    texts = text_guard._Texts(toy_pipeline.tokenizer)
    directions = shield_directions(toy_pipeline, recipe)
    allowed = allowed_tokens(toy_pipeline.tokenizer, sorted(concept_words(recipe.target_prompts, recipe.anchor_prompts)))
    generator = torch.Generator().manual_seed(99)  # not the guard's seed: contexts it never trained on
    pairs = []
    for prompt in recipe.target_prompts[::5]:
        words = texts.words(prompt)
        pairs.append((text_guard.text_attack(base, base, directions, texts, words, allowed,
                                             texts.length - 2 - len(words), generator, steps=16), words))
    unguarded = text_guard.response_kept(base, base, directions, texts, pairs)
    kept = text_guard.response_kept(guarded, base, directions, texts, pairs)
    assert float(unguarded.median()) < 0.5  # the attack on the plain encoder takes most of the response away
    assert float(kept.median()) > float(unguarded.median()) + 0.3

    # prompts without the concept's words keep their output
    others = recipe.anchor_prompts[::7] + ["", "a photo of a star", "something purple"]
    others += text_guard.composed_prompts(recipe.anchor_prompts, 4, seed=5)  # several objects named
    ids = toy_pipeline.tokenizer(others, padding="max_length", max_length=texts.length, truncation=True,
                                 return_tensors="pt").input_ids
    with torch.no_grad():
        before, after = base(ids)[0], guarded(ids)[0]
    change = (after - before).norm(dim=-1).mean() / before.norm(dim=-1).mean()
    assert float(change) < 0.05
    # … least of all along the shield's directions, which its gate reads: on the scale of red's own response,
    # 0.0007 here with the gate term, 0.024 without it (then two guards tipped two-shape prompts)
    with torch.no_grad():
        own = (base(texts.batch([texts.row([], texts.words(p)) for p in recipe.target_prompts]))[0] @ directions.T)
    gate = ((after - before) @ directions.T).pow(2).sum(-1).mean() / own.pow(2).sum(-1).mean()
    assert float(gate) < 0.005


def test_a_guard_file_that_does_not_fit_is_refused_naming_it(toy_pipeline, red_guard, tmp_path, capsys):
    _, path = red_guard
    weights = load_file(str(path))
    key = next(k for k in weights if k.endswith(".lora_B.weight"))
    weights[key] = weights[key][:-1]  # one output row short
    broken = tmp_path / "broken.safetensors"
    save_file(weights, str(broken))
    encoder = copy.deepcopy(toy_pipeline.text_encoder)
    with pytest.raises(ValueError, match="broken.safetensors"):
        text_guard.apply_guards(encoder, [broken])
    with pytest.raises(SystemExit) as exit_:  # the command: one line, exit 2, nothing written
        text_guard.main(["bake", "--adapter", "toy-red", "--guard", str(broken), "-o", str(tmp_path / "out")])
    assert exit_.value.code == 2 and not (tmp_path / "out").exists()
    assert "broken.safetensors" in capsys.readouterr().err.strip().splitlines()[-1]


def test_bake_puts_the_guard_into_the_text_encoder(toy_pipeline, red_guard, tmp_path):
    from dt_lora import toy

    _, path = red_guard
    out = tmp_path / "guarded"
    text_guard.main(["bake", "--adapter", "toy-red", "--guard", str(path), "-o", str(out)])
    baked = toy.load(model_dir=out)
    expected = copy.deepcopy(toy_pipeline.text_encoder)
    text_guard.apply_guards(expected, [path])
    for (name, mine), theirs in zip(baked.text_encoder.state_dict().items(), expected.half().float().state_dict().values()):
        assert torch.equal(mine, theirs), name
    provenance = json.loads((out / "dt_lora.json").read_text())
    assert provenance["text_guards"] == ["red-guard.safetensors"]
    assert provenance["concepts"][0]["name"] == "toy-red"


def test_a_guard_stacked_with_another_shield_keeps_that_shields_gate_too(toy_pipeline, tmp_path):
    from dt_lora.locality import shield_directions

    red, circle = (load_recipe(recipe_path(name)) for name in ("toy-red", "toy-circle"))
    directions = shield_directions(toy_pipeline, circle)
    texts = text_guard._Texts(toy_pipeline.tokenizer)
    others = [p for p in red.anchor_prompts[::7] + text_guard.composed_prompts(red.anchor_prompts, 4, seed=5)
              if "circle" not in p]
    ids = texts.batch([texts.row([], texts.words(p)) for p in others])
    base = toy_pipeline.text_encoder
    with torch.no_grad():
        before = base(ids)[0]
    settings = text_guard.GuardSettings(rounds=1, steps=80, attack_steps=8)
    changes = []
    for stacked_with in ([], [circle]):  # the circle's gate: 0.00018 of its response alone, 0.00006 stacked
        weights = text_guard.train_guard(toy_pipeline, red, settings, log=lambda line: None, stacked_with=stacked_with)
        guarded = copy.deepcopy(base)
        text_guard.apply_guards(guarded, [text_guard.write_guard(tmp_path / f"{len(stacked_with)}.safetensors",
                                                                 weights, red, settings, stacked_with)])
        with torch.no_grad():
            changes.append(float(((guarded(ids)[0] - before) @ directions.T).pow(2).sum(-1).mean()))
    assert changes[1] < changes[0] / 2


def test_a_guard_stacked_with_its_own_recipe_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        text_guard.main(["train", "toy-red", "--stacked-with", "toy-red", "-o", str(tmp_path / "g.safetensors")])
    assert exit_.value.code == 2 and not (tmp_path / "g.safetensors").exists()
    assert "own recipe" in capsys.readouterr().err.strip().splitlines()[-1]
