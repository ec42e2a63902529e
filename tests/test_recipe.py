"""Concept recipes: expansion, overrides, and errors that name the file and the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dt_lora.errors import UserError
from dt_lora.recipe import NUMBER_BOUNDS, Recipe, RecipeError, load_recipe, override_flag, override_keys

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
    ('name = "x"\n[target]\ntemplates = ["a {colour} circle"]\n', {}, r"target\.templates\[0\]: .*\{colour\}"),
    ('name = "x"\n[target]\nprompts = ["p"]\n', {}, r"anchors: .*needs anchor prompts"),
    ('name = "x"\n[target]\nprompts = ["p"]\n[anchors]\nprompts=["q"]\n[scramble]\nspace = "fourier"\n', {},
     r"scramble\.space: must be 'pixel' or 'latent'"),
    ('[target]\nprompts = ["p"]\n', {}, r"name: missing"),
    ('name = "x"\n[target\n', {}, r"r\.toml: not valid TOML"),
    ('name = "x"\n[target]\nprompts = ["p"]\n[anchors]\nprompts=["q"]\n', {"train.steps": "many"},
     r"^--train-steps: train\.steps: expected int, got 'many'$"),
    ('name = "x"\n[target]\nprompts = ["p"]\n[anchors]\nprompts=["q"]\n', {"train.steps": "2.5"},
     r"^--train-steps: train\.steps: expected int"),
    ('name = "x"\n[target]\nprompts = ["p"]\n[anchors]\nprompts=["q"]\n[train]\nsteps = inf\n', {},
     r"r\.toml: train\.steps: expected int, got inf$"),  # int(inf) raises OverflowError, not ValueError
    ('name = "x"\ntrain = 5\n[target]\nprompts = ["p"]\n[anchors]\nprompts=["q"]\n', {"train.steps": "3"},
     r"r\.toml: train: expected a table, got 5$"),  # the file is at fault, not the flag
])
def test_errors_name_file_key_and_problem(tmp_path, text, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text), overrides)


VALID = 'name = "x"\n[target]\nprompts = ["p"]\n[anchors]\nprompts = ["q"]\n'


@pytest.mark.parametrize("overrides, message", [
    ({"train.learning_rate": "nan"}, r"train\.learning_rate: must be a finite number, got nan"),
    ({"train.learning_rate": "0"}, r"train\.learning_rate: must be more than 0, got 0\.0"),
    ({"train.learning_rate": "-1e-3"}, r"train\.learning_rate: must be more than 0, got -0\.001"),
    ({"train.batch_size": "0"}, r"train\.batch_size: must be from 1 to 65,536, got 0"),
    ({"sampling.steps": "0"}, r"sampling\.steps: must be from 1 to 1,000 \(the samplers have 1000 noise levels\), "
                              r"got 0"),
    ({"sampling.batch_size": "0"}, r"sampling\.batch_size: must be from 1 to 65,536, got 0"),
    ({"lora.rank": "0"}, r"lora\.rank: must be from 1 to 1,024, got 0"),
    ({"lora.alpha": "0"}, r"lora\.alpha: must be more than 0 and at most 10,000, got 0\.0"),
    ({"lora.alpha": "-4"}, r"lora\.alpha: must be more than 0 and at most 10,000, got -4\.0"),
    ({"train.seed": "-1"}, r"train\.seed: must be from 0 to 2\*\*32 - 1, got -1"),
    ({"train.preservation_weight": "-1"}, r"train\.preservation_weight: must be from 0 to 10,000, got -1\.0"),
    # NaN passes every `<` test, so each float field is checked for it on its own
    ({"train.preservation_weight": "nan"}, r"train\.preservation_weight: must be a finite number, got nan"),
    ({"train.anchor_scale_jitter": "nan"}, r"train\.anchor_scale_jitter: must be a finite number"),
    ({"train.target_scale_min": "1.5"},
     r"train\.target_scale_min: must be \"auto\" or more than 0 and at most 1, got 1\.5"),
    ({"train.target_scale_min": "nan"}, r"train\.target_scale_min: must be a finite number, got nan"),
    ({"train.target_scale_min": "low"}, r"train\.target_scale_min: expected \"auto\" or a float, got 'low'"),
    ({"sampling.guidance": "nan"}, r"sampling\.guidance: must be a finite number"),
    ({"sampling.guidance": "inf"}, r"sampling\.guidance: must be a finite number, got inf"),
    ({"sampling.guidance": "-1e400"}, r"sampling\.guidance: must be a finite number, got -inf"),
    ({"lora.alpha": "nan"}, r"lora\.alpha: must be a finite number"),
    ({"train.unconditional_share": "nan"}, r"train\.unconditional_share: must be a finite number"),
    ({"name": "../x"}, r"name: '\.\./x' is not a safe file name"),
    ({"name": "/tmp/x"}, r"name: '/tmp/x' is not a safe file name"),
    ({"name": "a b"}, r"name: 'a b' is not a safe file name"),
    ({"name": ".hidden"}, r"name: '\.hidden' is not a safe file name"),
])
def test_every_setting_is_checked_before_any_work(tmp_path, overrides, message):
    (dotted,) = overrides
    with pytest.raises(RecipeError, match="^" + re.escape(override_flag(dotted) + ": ") + message):
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
    ("5", "pixel", r"scramble\.grid: 5 does not divide the base model's 32x32 images .*; use one of \[2, 4, 8, 16, 32\]"),
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


# ---- every bad input is one line naming where it came from (file or flag), the key and the problem


def run_train(argv, capsys) -> str:
    """`dt-lora train ARGV` on input it must refuse before any work: the one line it printed to stderr."""
    from dt_lora.cli import main

    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("dt-lora train: error: "), err
    return err.removeprefix("dt-lora train: error: ")


def test_a_recipe_error_is_a_user_error():
    assert issubclass(RecipeError, UserError) and issubclass(RecipeError, ValueError)


def template_recipe(templates: str, anchors: str = '"a {colour} square"') -> str:
    return (f'name = "x"\n[target]\ntemplates = [{templates}]\nvars = {{ colour = ["red", "blue"] }}\n'
            f'[anchors]\ntemplates = [{anchors}]\nvars = {{ colour = ["red"] }}\n')


@pytest.mark.parametrize("template, problem", [
    ("a {} circle", "'a {} circle' has a positional field {}; name one of target.vars instead, like {colour}"),
    ("a {0} circle", "'a {0} circle' has a positional field {0}; name one of target.vars instead, like {colour}"),
    ("a {colour circle", "'a {colour circle' has a stray brace or a broken field (expected '}' before end of string); "
                         "write {{ or }} for a literal brace"),
    ("a colour} circle", "'a colour} circle' has a stray brace or a broken field (Single '}' encountered in format string); "
                         "write {{ or }} for a literal brace"),
    ("a { circle", "'a { circle' has a stray brace or a broken field (expected '}' before end of string); "
                   "write {{ or }} for a literal brace"),
    ("a {shape} circle", "'a {shape} circle' uses {shape} but target.vars has no 'shape'"),
    ("a {colour.x} circle", "'a {colour.x} circle' has the field {colour.x}; a field is a variable's bare name, "
                            "without '.' or '[]'"),
    ("a {colour[0]} circle", "'a {colour[0]} circle' has the field {colour[0]}; a field is a variable's bare name, "
                             "without '.' or '[]'"),
    ("a {colour!r} circle", "'a {colour!r} circle' has the field {colour!r}; write {colour} "
                            "(no conversion or format spec)"),
    ("a {colour:>9} circle", "'a {colour:>9} circle' has the field {colour:>9}; write {colour} "
                             "(no conversion or format spec)"),
    ("a {colour:{colour}} circle", "'a {colour:{colour}} circle' has the field {colour:{colour}}; write {colour} "
                                   "(no conversion or format spec)"),
    ("a {colour!} circle", "'a {colour!} circle' has a stray brace or a broken field (expected ':' after conversion specifier); "
                           "write {{ or }} for a literal brace"),
])
def test_a_bad_template_is_one_line_naming_file_key_and_problem(tmp_path, capsys, template, problem):
    path = write(tmp_path, template_recipe(f'"a {{colour}} star", {json.dumps(template)}'))
    with pytest.raises(RecipeError) as error:  # was an IndexError / KeyError / ValueError traceback from format
        load_recipe(path)
    assert str(error.value).startswith(f"{path}: target.templates[1]: ") and str(error.value).endswith(problem)
    assert run_train([str(path)], capsys) == str(error.value)


def test_anchor_templates_and_empty_variables_are_checked_too(tmp_path):
    with pytest.raises(RecipeError, match=r"r\.toml: anchors\.templates\[0\]: 'a \{\} square' has a positional field"):
        load_recipe(write(tmp_path, template_recipe('"a {colour} star"', anchors='"a {} square"')))
    text = template_recipe('"a {colour} star"').replace('colour = ["red", "blue"]', "colour = []")
    with pytest.raises(RecipeError, match=r"r\.toml: target\.templates\[0\]: 'a \{colour\} star' uses \{colour\} "
                                          r"but target\.vars\.colour is empty$"):
        load_recipe(write(tmp_path, text))  # expanded to no prompts at all


def test_a_template_from_a_flag_is_blamed_on_the_flag(tmp_path, capsys):
    path = write(tmp_path, template_recipe('"a {colour} star"'))
    err = run_train([str(path), "--target-templates", "a {colour} circle,a {} circle"], capsys)
    assert err == ("--target-templates: target.templates[1]: 'a {} circle' has a positional field {}; "
                   "name one of target.vars instead, like {colour}")


def test_escaped_braces_are_literal_text(tmp_path):
    recipe = load_recipe(write(tmp_path, template_recipe('"a {{colour}} {colour} star"')))
    assert recipe.target_prompts == ["a {colour} red star", "a {colour} blue star"]


def test_templates_may_not_expand_without_bound(tmp_path):
    many = "[" + ", ".join(f'"v{i}"' for i in range(100)) + "]"
    text = (f'name = "x"\n[target]\ntemplates = ["{{a}} {{b}} {{c}}"]\nvars = {{ a = {many}, b = {many}, c = {many} }}\n'
            '[train]\npreservation = "none"\n')
    with pytest.raises(RecipeError, match=r"r\.toml: target\.templates: expand to 1,000,000 prompts "
                                          r"\(templates × vars\); at most 100,000$"):
        load_recipe(write(tmp_path, text))  # checked before expanding: 10^6 prompts, or 10^20 with more vars


@pytest.mark.parametrize("flag, value, message", [
    ("--train-steps", "abc", "--train-steps: train.steps: expected int, got 'abc'"),
    ("--lora-rank", "-1", "--lora-rank: lora.rank: must be from 1 to 1,024, got -1"),
    ("--train-learning-rate", "x", "--train-learning-rate: train.learning_rate: expected float, got 'x'"),
    ("--train-learning-rate", "nan", "--train-learning-rate: train.learning_rate: must be a finite number, got nan"),
    ("--lora-alpha", "0", "--lora-alpha: lora.alpha: must be more than 0 and at most 10,000, got 0.0"),
    ("--scramble-flips", "maybe", "--scramble-flips: scramble.flips: expected true or false, got 'maybe'"),
    ("--train-target-scale-min", "2", "--train-target-scale-min: train.target_scale_min: must be \"auto\" or more "
                                      "than 0 and at most 1, got 2.0"),
    ("--name", "../x", "--name: name: '../x' is not a safe file name"),
])
def test_a_bad_flag_is_blamed_on_the_flag_not_the_recipe_file(tmp_path, monkeypatch, capsys, flag, value, message):
    monkeypatch.chdir(tmp_path)
    err = run_train(["toy-circle", flag, value], capsys)  # a shipped recipe, by name
    assert err.startswith(message), err
    assert "toy-circle.toml" not in err and ".toml" not in err


def test_a_bad_value_in_the_file_is_blamed_on_the_file_even_with_flags(tmp_path, capsys):
    path = write(tmp_path, VALID + "[train]\nsteps = 0\n")
    err = run_train([str(path), "--train-batch-size", "2", "--lora-rank", "3"], capsys)
    assert err == f"{path}: train.steps: must be from 1 to 10,000,000, got 0"


def test_every_recipe_key_has_the_flag_that_errors_name(capsys):
    from dt_lora.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for dotted, annotation in override_keys():
        if dotted not in ("target.vars", "anchors.vars"):  # tables: set in the file only
            assert re.search(rf"\s{re.escape(override_flag(dotted))}\s", help_text), dotted


# ---- bounds: every number in a recipe, from one table


def number_keys() -> set[str]:
    def is_number(annotation) -> bool:
        return annotation in (int, float, float | None)

    return {dotted for dotted, annotation in override_keys() if is_number(annotation)}


def test_every_number_in_a_recipe_has_bounds():
    assert set(NUMBER_BOUNDS) == number_keys()


def test_the_defaults_and_every_shipped_recipe_are_within_bounds():
    for path in sorted(ADAPTERS.glob("*.toml")):
        load_recipe(path)


def test_defaults_within_bounds_for_every_number():
    recipe = load_recipe(None, {"name": "x", "target.prompts": "p", "anchors.prompts": "q"})
    for key, bound in NUMBER_BOUNDS.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(recipe, section) if section else recipe, name)
        assert value is None or bound.problem(value) is None, key


def recipe_with(key: str, value: str) -> str:
    """VALID with the dotted `key` set to `value` (TOML text) in the file."""
    tables = {"target": ['prompts = ["p"]'], "anchors": ['prompts = ["q"]']}
    section, _, name = key.rpartition(".")
    if not section:
        return f'{name} = {value}\n' + VALID
    tables.setdefault(section, []).append(f"{name} = {value}")
    return 'name = "x"\n' + "".join(f"[{table}]\n" + "\n".join(lines) + "\n" for table, lines in tables.items())


@pytest.mark.parametrize("key, value, problem", [
    ("resolution", "-8", "must be 0 (not stated) or a multiple of 8 from 8 to 16,384 "
                         "(the VAE halves the image side three times), got -8"),
    ("resolution", "500", "must be 0 (not stated) or a multiple of 8 from 8 to 16,384"),
    ("resolution", "100000", "got 100,000"),
    ("target.images", "0", "must be from 1 to 100,000, got 0"),
    ("anchors.images", "10000000", "must be from 1 to 100,000, got 10,000,000"),
    ("scramble.grid", "1", "must be from 2 to 1,024 (a 1x1 grid has one tile, which cannot move), got 1"),
    ("scramble.grid", "0", "must be from 2 to 1,024"),
    ("lora.rank", "100000", "must be from 1 to 1,024, got 100,000"),
    ("lora.alpha", "inf", "must be a finite number, got inf"),
    ("lora.alpha", "1e6", "must be more than 0 and at most 10,000, got 1000000.0"),
    ("train.steps", "0", "must be from 1 to 10,000,000, got 0"),
    ("train.steps", "4500000000", "must be from 1 to 10,000,000, got 4,500,000,000"),
    ("train.learning_rate", "-inf", "must be a finite number, got -inf"),
    ("train.batch_size", "-2", "must be from 1 to 65,536, got -2"),
    ("train.seed", str(2**32), "must be from 0 to 2**32 - 1, got 4,294,967,296"),
    ("train.unconditional_share", "1.5", "must be from 0 to 1, got 1.5"),
    ("train.anchor_scale_jitter", "-1", "must be from 0 to 100, got -1.0"),
    ("train.target_scale_min", "0", 'must be "auto" or more than 0 and at most 1, got 0.0'),
    ("train.adversarial_rounds", "-1", "must be from 0 to 100, got -1"),
    ("train.adversarial_prompts", "0", "must be from 1 to 100,000, got 0"),
    ("train.prompt_contexts", "-1", "must be from 0 to 1,000, got -1"),
    ("train.checkpoint_every", "0", "must be from 1 to 10,000,000, got 0"),
    ("train.sample_every", "-1", "must be from 0 to 10,000,000, got -1"),
    ("guard.rounds", "-1", "must be from 0 to 100, got -1"),
    ("guard.steps", "0", "must be from 1 to 10,000,000, got 0"),
    ("guard.rank", "0", "must be from 1 to 1,024, got 0"),
    ("guard.learning_rate", "0", "must be more than 0, got 0.0"),
    ("guard.keep_weight", "nan", "must be a finite number, got nan"),
    ("guard.gate_weight", "-1", "must be from 0 to 10,000, got -1.0"),
    ("guard.batch", "0", "must be from 1 to 65,536, got 0"),
    ("guard.free_tokens", "76", "must be from 1 to 75 (CLIP reads 77 tokens, two of them its start and end), "
                                "got 76"),
    ("guard.attack_steps", "0", "must be from 1 to 10,000,000, got 0"),
    ("guard.seed", str(2**63), "must be from 0 to 2**63 - 1, got 9,223,372,036,854,775,808"),
    ("guard.composed", "-1", "must be from 0 to 100,000, got -1"),
    ("sampling.steps", "1001", "must be from 1 to 1,000 (the samplers have 1000 noise levels), got 1,001"),
    ("sampling.guidance", "-1", "must be from 0 to 100, got -1.0"),
    ("sampling.batch_size", "0", "must be from 1 to 65,536, got 0"),
])
def test_numbers_out_of_bounds_name_file_or_flag_key_and_bound(tmp_path, capsys, key, value, problem):
    path = write(tmp_path, recipe_with(key, value))
    with pytest.raises(RecipeError) as from_file:
        load_recipe(path)
    assert str(from_file.value).startswith(f"{path}: {key}: ") and problem in str(from_file.value)
    # `--flag=VALUE`: argparse takes a separate "-inf" for an option
    err = run_train([str(write(tmp_path, VALID)), f"{override_flag(key)}={value}"], capsys)
    assert err.startswith(f"{override_flag(key)}: {key}: ") and problem in err, err


def test_numbers_at_their_bounds_are_accepted(tmp_path):
    for key, bound in NUMBER_BOUNDS.items():
        for value in (bound.low, bound.high):
            if value is None or (value == bound.low and bound.low_open):
                continue
            recipe = load_recipe(write(tmp_path, VALID), {key: str(value)})
            section, _, name = key.rpartition(".")
            assert getattr(getattr(recipe, section) if section else recipe, name) == value, key
    assert load_recipe(write(tmp_path, VALID), {"resolution": "0"}).resolution == 0  # 0: not stated


# ---- a shipped shield's or recipe's name, and local files of that name (dt_lora.recipes)


@pytest.fixture
def fresh_notes(monkeypatch):
    """Each test sees the note about a local file hiding a shipped one anew (it is said once a process)."""
    from dt_lora import recipes

    monkeypatch.setattr(recipes, "_shadowing_noted", set(), raising=False)


def test_a_local_folder_does_not_hide_a_shipped_shield_or_recipe(tmp_path, monkeypatch, capsys, fresh_notes):
    from dt_lora.cli import build_parser
    from dt_lora.recipes import RECIPES_DIR, adapter_path, recipe_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy-circle").mkdir()  # e.g. an eval report folder named after the shield
    (tmp_path / "toy-circle.toml").mkdir()
    assert adapter_path("toy-circle") == RECIPES_DIR / "toy-circle.safetensors"
    assert build_parser().parse_args(["generate", "x", "--adapter", "toy-circle:0.5", "-o", "o"]).adapter == [
        (RECIPES_DIR / "toy-circle.safetensors", 0.5)]
    assert recipe_path("toy-circle") == recipe_path("toy-circle.toml") == RECIPES_DIR / "toy-circle.toml"
    assert capsys.readouterr().err == ""
    (tmp_path / "toy-cirle").mkdir()
    assert adapter_path("toy-cirle") == Path("toy-cirle")  # nothing ships by that name: it stays the path it is


def test_a_local_file_that_hides_a_shipped_one_is_said_once(tmp_path, monkeypatch, capsys, fresh_notes):
    from dt_lora.cli import build_parser
    from dt_lora.recipes import adapter_path, recipe_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy-circle").write_bytes(b"mine")
    assert adapter_path("toy-circle") == Path("toy-circle")  # the user's own file comes first
    assert build_parser().parse_args(["merge", "toy-circle", "toy-circle:abc", "-o", "m"]).adapters == [
        Path("toy-circle"), Path("toy-circle:abc")]
    assert recipe_path("toy-circle") == Path("toy-circle")
    err = capsys.readouterr().err.splitlines()
    assert err == ["dt-lora: note: using the local file toy-circle, not the shipped shield of that name "
                   "(`dt-lora recipes --path` shows where that one is)"]
    (tmp_path / "toy-red.toml").write_text('name = "mine"\n')
    assert recipe_path("toy-red.toml") == Path("toy-red.toml")
    assert "using the local file toy-red.toml, not the shipped recipe" in capsys.readouterr().err


def test_a_path_means_the_local_file_without_a_note(tmp_path, monkeypatch, capsys, fresh_notes):
    from dt_lora.recipes import adapter_path, recipe_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy-circle").write_bytes(b"mine")
    assert adapter_path("./toy-circle") == Path("toy-circle")
    assert recipe_path("./toy-circle") == Path("toy-circle")
    assert capsys.readouterr().err == ""
    with pytest.raises(FileNotFoundError, match="'./toy-red' is neither a file nor a shipped recipe"):
        recipe_path("./toy-red")  # a path that is missing is not a shipped name
    assert adapter_path("./toy-red") == Path("toy-red")
