"""Concept recipes: expansion, overrides, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dt_lora.recipe import Recipe, RecipeError, load_recipe

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_every_shipped_recipe_loads():
    recipes = sorted(ADAPTERS.glob("*.toml"))
    assert len(recipes) >= 13  # 10 toy concepts + SD examples
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.target_prompts or recipe.target.image_folder, path


def test_templates_expand_over_every_combination(tmp_path):
    recipe = load_recipe(write(tmp_path, """
name = "x"
[target]
prompts = ["a lone prompt"]
templates = ["a {colour} {shape}"]
vars = { colour = ["red", "blue"], shape = ["circle", "star"] }
[train]
preservation = "none"
"""))
    assert recipe.target_prompts == ["a lone prompt", "a red circle", "a red star", "a blue circle", "a blue star"]


def test_toy_shape_recipe_targets_only_its_shape():
    recipe = load_recipe(ADAPTERS / "toy-circle.toml")
    assert all("circle" in p for p in recipe.target_prompts)
    assert not any("circle" in p for p in recipe.anchor_prompts)
    assert len(recipe.target_prompts) == 25 and len(recipe.anchor_prompts) == 100
    assert not set(recipe.target.paraphrases) & set(recipe.target_prompts)


def test_overrides_convert_strings_like_cli_flags(tmp_path):
    recipe = load_recipe(ADAPTERS / "toy-circle.toml", {
        "train.steps": "50", "train.learning_rate": "3e-4", "scramble.flips": "true",
        "lora.targets": "attn2.to_k,attn2.to_v", "name": "renamed"})
    assert recipe.train.steps == 50 and recipe.train.learning_rate == 3e-4
    assert recipe.scramble.flips is True
    assert recipe.lora.targets == ["attn2.to_k", "attn2.to_v"]
    assert recipe.name == "renamed"


def test_fingerprint_follows_data_settings_only():
    a = load_recipe(ADAPTERS / "toy-circle.toml")
    b = load_recipe(ADAPTERS / "toy-circle.toml", {"train.steps": "7"})
    c = load_recipe(ADAPTERS / "toy-circle.toml", {"scramble.grid": "2"})
    keys = ("target", "anchors", "scramble", "sampling")
    assert a.fingerprint(*keys) == b.fingerprint(*keys)
    assert a.fingerprint(*keys) != c.fingerprint(*keys)


@pytest.mark.parametrize("text, overrides, message", [
    ('name = "x"\n[target]\nprompts = ["p"]\n[lora]\nrank = "eight"\n', {}, r"r\.toml: lora\.rank: expected int"),
    ('name = "x"\n[target]\nprompts = ["p"]\n[trian]\nsteps = 3\n', {}, r"r\.toml: trian: unknown key"),
    ('name = "x"\n[target]\nprompts = ["p"]\n[train]\nstep = 3\n', {}, r"train\.step: unknown key"),
    ('name = "x"\n[target]\ntemplates = ["a {colour} circle"]\n', {}, r"target\.templates: .*\{colour\}"),
    ('name = "x"\n[target]\nprompts = ["p"]\n', {}, r"anchors: .*needs anchor prompts"),
    ('name = "x"\n[target]\nprompts = ["p"]\n[anchors]\nprompts=["q"]\n[scramble]\nspace = "fourier"\n', {},
     r"scramble\.space: must be 'pixel' or 'latent'"),
    ('[target]\nprompts = ["p"]\n', {}, r"name: missing"),
    ('name = "x"\n[target\n', {}, r"r\.toml: not valid TOML"),
    ('name = "x"\n[target]\nprompts = ["p"]\n[anchors]\nprompts=["q"]\n', {"train.steps": "many"},
     r"train\.steps: expected int, got 'many'"),
    ('name = "x"\n[target]\nprompts = ["p"]\n[anchors]\nprompts=["q"]\n', {"train.steps": "2.5"},
     r"train\.steps: expected int"),
])
def test_errors_name_file_key_and_problem(tmp_path, text, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text), overrides)


VALID = 'name = "x"\n[target]\nprompts = ["p"]\n[anchors]\nprompts = ["q"]\n'


@pytest.mark.parametrize("overrides, message", [
    ({"train.learning_rate": "nan"}, r"train\.learning_rate: must be a finite number, got nan"),
    ({"train.learning_rate": "0"}, r"train\.learning_rate: must be more than 0, got 0\.0"),
    ({"train.learning_rate": "-1e-3"}, r"train\.learning_rate: must be more than 0"),
    ({"train.batch_size": "0"}, r"train\.batch_size: must be at least 1, got 0"),
    ({"sampling.steps": "0"}, r"sampling\.steps: must be at least 1, got 0"),
    ({"sampling.batch_size": "0"}, r"sampling\.batch_size: must be at least 1"),
    ({"lora.rank": "0"}, r"lora\.rank: must be at least 1"),
    ({"lora.alpha": "0"}, r"lora\.alpha: must be more than 0, got 0\.0"),
    ({"lora.alpha": "-4"}, r"lora\.alpha: must be more than 0"),
    ({"train.seed": "-1"}, r"train\.seed: must be between 0 and 2\*\*32 - 1, got -1"),
    ({"train.preservation_weight": "-1"}, r"train\.preservation_weight: must be 0 or more"),
    # NaN passes every `<` test, so each float field is checked for it on its own
    ({"train.preservation_weight": "nan"}, r"train\.preservation_weight: must be a finite number"),
    ({"train.anchor_scale_jitter": "nan"}, r"train\.anchor_scale_jitter: must be a finite number"),
    ({"train.target_scale_min": "1.5"}, r"train\.target_scale_min: must be \"auto\" or in \(0, 1\], got 1\.5"),
    ({"train.target_scale_min": "low"}, r"train\.target_scale_min: expected \"auto\" or a float, got 'low'"),
    ({"sampling.guidance": "nan"}, r"sampling\.guidance: must be a finite number"),
    ({"sampling.guidance": "inf"}, r"sampling\.guidance: must be a finite number, got inf"),
    ({"lora.alpha": "nan"}, r"lora\.alpha: must be a finite number"),
    ({"train.unconditional_share": "nan"}, r"train\.unconditional_share: must be a finite number"),
    ({"name": "../x"}, r"name: '\.\./x' is not a safe file name"),
    ({"name": "/tmp/x"}, r"name: '/tmp/x' is not a safe file name"),
    ({"name": "a b"}, r"name: 'a b' is not a safe file name"),
    ({"name": ".hidden"}, r"name: '\.hidden' is not a safe file name"),
])
def test_every_setting_is_checked_before_any_work(tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=r"r\.toml: " + message):
        load_recipe(write(tmp_path, VALID), overrides)


def test_the_weakest_target_strength_is_a_number_or_auto(tmp_path):
    assert load_recipe(write(tmp_path, VALID)).train.target_scale_min == 0.5  # the default
    assert load_recipe(write(tmp_path, VALID), {"train.target_scale_min": "auto"}).train.target_scale_min is None
    assert load_recipe(write(tmp_path, VALID + '[train]\ntarget_scale_min = "auto"\n')).train.target_scale_min is None
    assert load_recipe(write(tmp_path, VALID + "[train]\ntarget_scale_min = 0.5\n")).train.target_scale_min == 0.5
    assert load_recipe(write(tmp_path, VALID), {"train.target_scale_min": "0.25"}).train.target_scale_min == 0.25


def test_nan_in_the_toml_file_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"r\.toml: train\.learning_rate: must be a finite number, got nan"):
        load_recipe(write(tmp_path, VALID + "[train]\nlearning_rate = nan\n"))


def test_names_that_are_plain_slugs_are_accepted(tmp_path):
    for name in ("x", "toy-circle", "sd15_face.v2", "A1"):
        assert load_recipe(write(tmp_path, VALID), {"name": name}).name == name


@pytest.mark.parametrize("grid, space, message", [
    ("5", "pixel", r"scramble\.grid: 5 does not divide the base model's 32x32 images .*; use one of \[1, 2, 4, 8, 16, 32\]"),
    ("64", "pixel", r"scramble\.grid: 64 does not divide"),
    ("16", "latent", r"scramble\.grid: 16 does not divide the base model's 8x8 latents"),
    ("3", "latent", r"scramble\.grid: 3 does not divide .* 8x8 latents"),
])
def test_grid_must_tile_the_base_models_images(tmp_path, grid, space, message):
    recipe = load_recipe(write(tmp_path, VALID), {"scramble.grid": grid, "scramble.space": space})
    with pytest.raises(RecipeError, match=message):
        recipe.validate_image_size(32, 8)


def test_grid_that_tiles_the_images_passes(tmp_path):
    load_recipe(write(tmp_path, VALID), {"scramble.grid": "8"}).validate_image_size(32, 8)
    load_recipe(write(tmp_path, VALID), {"scramble.grid": "8", "scramble.space": "latent"}).validate_image_size(32, 8)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_recipe_round_trips_through_dict():
    recipe = load_recipe(ADAPTERS / "toy-red.toml")
    assert isinstance(recipe, Recipe)
    assert recipe.to_dict()["target"]["vars"]["shape"][0] == "circle"
