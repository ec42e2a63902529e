"""guard: a shield's text-encoder part keeps its concept's response in context and other prompts' output, and
travels with the shield through training, stacking, merging, baking and kohya export."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dt_lora.adapters import AdapterError, load_adapters, read_adapter, unload_adapters, write_adapter
from dt_lora.adapters.bake import fuse_adapters
from dt_lora.cli import main
from dt_lora.recipe import RecipeError, load_recipe
from dt_lora.recipes import adapter_path, recipe_path
from dt_lora.shield import guard

SHORT = {"guard.rounds": "1", "guard.steps": "80", "guard.attack_steps": "8"}  # a short training, ~20 s


def short_recipe(name: str, **extra):
    return load_recipe(recipe_path(name), {**SHORT, **extra})


def with_guard(shield: str, parts, path):
    """The shipped shield `shield` with `parts` as its text-encoder parts, written to `path`."""
    adapter = read_adapter(adapter_path(shield))
    adapter.text_encoders = parts
    return write_adapter(path, adapter)


@pytest.fixture(scope="module")
def red_guarded(toy_pipeline, tmp_path_factory):
    """toy-red's shipped shield with a short-trained guard."""
    recipe = short_recipe("toy-red")
    parts = guard.train_guard(toy_pipeline, recipe, log=lambda line: None)
    return recipe, with_guard("toy-red", parts, tmp_path_factory.mktemp("guard") / "red-guarded.safetensors")


def guarded_encoder(pipeline, adapters):
    fused = copy.deepcopy(pipeline)
    fuse_adapters(fused, adapters)
    return fused.text_encoder


def test_a_guard_keeps_the_response_the_text_attack_takes_away(toy_pipeline, red_guarded):
    from dt_lora.search import allowed_tokens
    from dt_lora.shield.locality import concept_words, shield_directions

    recipe, path = red_guarded
    base = toy_pipeline.text_encoder
    guarded = guarded_encoder(toy_pipeline, [path])
    texts = guard._Texts(toy_pipeline)
    directions = shield_directions(toy_pipeline, recipe)
    allowed = allowed_tokens(toy_pipeline.tokenizer, sorted(concept_words(recipe.target_prompts, recipe.anchor_prompts)))
    generator = torch.Generator().manual_seed(99)  # not the guard's seed: contexts it never trained on
    pairs = []
    for prompt in recipe.target_prompts[::5]:
        words = texts.words(prompt)
        pairs.append((guard.text_attack([base], [base], directions, texts, words, allowed,
                                        texts.length - 2 - len(words), generator, steps=16), words))
    unguarded = guard.response_kept([base], [base], directions, texts, pairs)
    kept = guard.response_kept([guarded], [base], directions, texts, pairs)
    assert float(unguarded.median()) < 0.5  # the attack on the plain encoder takes most of the response away
    assert float(kept.median()) > float(unguarded.median()) + 0.3

    # prompts without the concept's words keep their output
    others = recipe.anchor_prompts[::7] + ["", "a photo of a star", "something purple"]
    others += guard.composed_prompts(recipe.anchor_prompts, 4, seed=5)  # several objects named
    ids = toy_pipeline.tokenizer(others, padding="max_length", max_length=texts.length, truncation=True,
                                 return_tensors="pt").input_ids
    with torch.no_grad():
        before, after = base(ids)[0], guarded(ids)[0]
    change = (after - before).norm(dim=-1).mean() / before.norm(dim=-1).mean()
    assert float(change) < 0.05
    # … least of all along the shield's directions, which its gate reads: on the scale of red's own response,
    # 0.0007 here with the gate term, 0.024 without it (then two guards tipped two-shape prompts)
    with torch.no_grad():
        own = (base(texts.batch([texts.row([], texts.words(p)) for p in recipe.target_prompts])[0])[0] @ directions.T)
    gate = ((after - before) @ directions.T).pow(2).sum(-1).mean() / own.pow(2).sum(-1).mean()
    assert float(gate) < 0.005


def test_the_guard_stacks_merges_bakes_and_exports_with_its_shield(toy_pipeline, red_guarded, tmp_path):
    from safetensors.torch import load_file

    _, path = red_guarded
    ids = toy_pipeline.tokenizer(["a red circle", "x y a red star", "a blue square"], padding="max_length",
                                 max_length=toy_pipeline.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        base = toy_pipeline.text_encoder(ids)[0]
        fused = guarded_encoder(toy_pipeline, [path])(ids)[0]
    assert (fused - base).abs().max() > 0.01
    stacked = copy.deepcopy(toy_pipeline)  # diffusers' load_lora_weights puts the part on the text encoder
    load_adapters(stacked, [adapter_path("toy-circle"), path])
    with torch.no_grad():
        torch.testing.assert_close(stacked.text_encoder(ids)[0], fused, rtol=0, atol=1e-5)
        unload_adapters(stacked)
        assert torch.equal(stacked.text_encoder(ids)[0], base)

    assert main(["merge", "toy-circle", str(path), "-o", str(tmp_path / "merged.safetensors")]) == 0
    merged = read_adapter(tmp_path / "merged.safetensors")
    assert merged.text_encoders["text_encoder"].rank == 8 and [c["name"] for c in merged.concepts] == ["toy-circle", "toy-red"]
    with torch.no_grad():
        torch.testing.assert_close(guarded_encoder(toy_pipeline, [tmp_path / "merged.safetensors"])(ids)[0], fused,
                                   rtol=0, atol=1e-6)

    assert main(["bake", "--adapter", "toy-circle", "--adapter", str(path), "-o", str(tmp_path / "baked"), "--dtype", "float32"]) == 0
    from dt_lora import toy

    with torch.no_grad():
        torch.testing.assert_close(toy.load(model_dir=tmp_path / "baked").text_encoder(ids)[0], fused, rtol=0, atol=1e-6)

    assert main(["export", str(path), "-o", str(tmp_path / "kohya.safetensors")]) == 0
    keys = load_file(str(tmp_path / "kohya.safetensors"))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    kohya = copy.deepcopy(toy_pipeline)
    kohya.load_lora_weights(str(tmp_path / "kohya.safetensors"))  # diffusers reads kohya's layout as A1111 does
    with torch.no_grad():
        torch.testing.assert_close(kohya.text_encoder(ids)[0], fused, rtol=0, atol=1e-5)


def test_a_guard_that_does_not_fit_is_refused_naming_the_file_and_layer(toy_pipeline, red_guarded, tmp_path, capsys):
    _, path = red_guarded
    adapter = read_adapter(path)
    key = next(k for k in adapter.text_encoders["text_encoder"].weights if k.endswith("q_proj.lora_B.weight"))
    adapter.text_encoders["text_encoder"].weights[key] = torch.zeros(7, 8)  # an output size this text encoder does not have
    adapter.text_encoders["text_encoder"].weights[key.replace("lora_B", "lora_A")] = torch.zeros(8, 7)
    broken = write_adapter(tmp_path / "broken.safetensors", adapter)
    with pytest.raises(AdapterError, match=r"broken.safetensors: text_encoder layer .*q_proj \(7×7\) does not fit"):
        load_adapters(copy.deepcopy(toy_pipeline), [broken])
    # the command: one line, exit 2, nothing written
    assert main(["bake", "--adapter", str(broken), "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert "broken.safetensors" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_guard_stacked_with_another_shield_keeps_that_shields_gate_too(toy_pipeline, red_guarded, tmp_path):
    from dt_lora.shield.locality import shield_directions

    red, alone = red_guarded
    circle = load_recipe(recipe_path("toy-circle"))
    directions = shield_directions(toy_pipeline, circle)
    texts = guard._Texts(toy_pipeline)
    others = [p for p in red.anchor_prompts[::7] + guard.composed_prompts(red.anchor_prompts, 4, seed=5)
              if "circle" not in p]
    (ids,) = texts.batch([texts.row([], texts.words(p)) for p in others])
    base = toy_pipeline.text_encoder
    with torch.no_grad():
        before = base(ids)[0]
    stacked = with_guard("toy-red", guard.train_guard(toy_pipeline, red, [circle], log=lambda line: None),
                         tmp_path / "stacked.safetensors")
    changes = []
    for path in (alone, stacked):  # the circle's gate: 0.00018 of its response alone, 0.00006 stacked
        with torch.no_grad():
            changes.append(float(((guarded_encoder(toy_pipeline, [path])(ids)[0] - before) @ directions.T)
                                 .pow(2).sum(-1).mean()))
    assert changes[1] < changes[0] / 2


def test_train_writes_the_guard_into_the_adapter_and_resumes_without_training_it_again(toy_pipeline, tmp_path,
                                                                                       monkeypatch):
    from dt_lora.shield.train import GUARD_FILE, train_adapter

    tiny = {"target.images": "8", "anchors.images": "8", "train.steps": "4", "train.batch_size": "4",
            "train.checkpoint_every": "2", "sampling.steps": "4", "guard.enabled": "true", "guard.rounds": "0",
            "guard.steps": "10", "guard.stacked_with": "toy-red"}
    recipe = load_recipe(recipe_path("toy-circle"), tiny)
    out, cache = tmp_path / "circle.safetensors", tmp_path / "cache"
    part = train_adapter(recipe, out, cache_dir=cache, pipeline=toy_pipeline, progress=False, stop_after=2)
    cached = tmp_path / "circle.safetensors.work" / GUARD_FILE
    assert part.adapter is None and cached.is_file()
    trained = []
    real_train_guard = guard.train_guard
    monkeypatch.setattr(guard, "train_guard", lambda *args, **kwargs: trained.append(1) or real_train_guard(*args, **kwargs))
    cached.write_bytes(b"not a safetensors file")  # damaged: trained again, not a traceback
    train_adapter(recipe, out, cache_dir=cache, pipeline=toy_pipeline, progress=False, stop_after=1)
    assert trained and cached.stat().st_size > 100
    monkeypatch.setattr(guard, "train_guard", lambda *args, **kwargs: pytest.fail("the guard was trained again"))
    train_adapter(recipe, out, cache_dir=cache, pipeline=toy_pipeline, progress=False)
    adapter = read_adapter(out)
    assert adapter.text_encoders["text_encoder"].rank == 8 and adapter.concepts[0]["guard"]["stacked_with"] == ["toy-red"]
    assert adapter.concepts[0]["guard"]["training_seconds"] > 0  # the run that trained it, not this one
    assert not (tmp_path / "circle.safetensors.work").exists()  # cleaned up after success
    assert not getattr(toy_pipeline.text_encoder, "peft_config", None)  # the base encoder is left as it was


def test_a_guard_stacked_with_its_own_recipe_or_a_missing_one_is_refused_before_any_work(tmp_path, capsys,
                                                                                          monkeypatch):
    from dt_lora.shield import train

    with pytest.raises(RecipeError, match="guard.stacked_with: names the recipe itself"):
        load_recipe(recipe_path("toy-red"), {"guard.stacked_with": "toy-red"})
    monkeypatch.setattr(train, "load_pipeline", lambda *args, **kwargs: pytest.fail("the base was loaded"))
    for other in ("toy-red", "toy-rde", str(recipe_path("toy-red"))):  # by name, misspelt, by path
        assert main(["train", "toy-red", "--guard-enabled", "true", "--guard-stacked-with", other,
                     "-o", str(tmp_path / "g.safetensors")]) == 2
        assert not list(tmp_path.iterdir())
        assert Path(other).stem in capsys.readouterr().err.strip().splitlines()[-1]
