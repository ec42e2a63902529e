"""The canvas world's recipe library: made from the world, loadable, refused early when asked wrongly."""

from __future__ import annotations

import pytest

from dt_lora import cli
from dt_lora.canvas import recipes, world
from dt_lora.evaluate.scorers import CanvasScorer
from dt_lora.recipe import load_recipe


def test_the_library_has_a_recipe_per_character_and_style_and_each_loads(tmp_path):
    paths = recipes.write_library(tmp_path)
    assert len(paths) == len(world.characters()) + len(world.STYLES)
    # beside them only the list of what dt-lora wrote, no temporary file
    assert sorted(tmp_path.iterdir()) == sorted(paths + [tmp_path / "dt_lora.json"])
    for path in paths[::9]:
        recipe = load_recipe(path)
        assert recipe.base == "canvas" and recipe.resolution == world.IMAGE_SIZE
        _, concept = CanvasScorer.concept(recipe)
        assert recipe.name == recipes.recipe_name(concept)


def test_a_characters_anchors_hold_its_neighbours_and_never_its_own_name():
    character = world.characters()[9]
    recipe = recipes.character_recipe(character.name)
    anchors = recipe["anchors"]["prompts"]
    neighbours = [c.name for c in world.characters() if c.group == character.group and c != character]
    assert all(any(n in a for a in anchors) for n in neighbours)
    assert not [a for a in anchors if world.named_in(a)[0] == character.name]
    assert character.look.describe() not in [world.named_in(a)[1] and world.named_in(a)[1].describe() for a in anchors]
    # the paraphrases are the world's held-out templates, never the training ones
    assert recipe["target"]["paraphrases"] == [t.format(name=character.name) for t in world.CHARACTER_HELDOUT_TEMPLATES]


def test_a_style_recipe_targets_the_artist_and_anchors_other_styles_and_plain_objects(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(recipes.to_toml(recipes.style_recipe("dotted")))
    recipe = load_recipe(path)
    assert {world.named_style(p) for p in recipe.target_prompts} == {"dotted"}
    assert "dotted" not in {world.named_style(p) for p in recipe.anchor_prompts}
    assert world.PLAIN in {world.named_style(p) for p in recipe.anchor_prompts}


@pytest.mark.parametrize("concepts, problem", [
    ("Nimian,Bob", "unknown canvas concept 'Bob'"),
    ("Nimian,Nimian", "canvas concept 'Nimian' is named twice"),
])
def test_a_library_with_an_unknown_or_repeated_concept_is_refused_before_anything_is_written(
        tmp_path, capsys, concepts, problem):
    out = tmp_path / "library"
    assert cli.main(["recipes", "--canvas-library", str(out), "--concepts", concepts]) == 2
    err = capsys.readouterr().err
    assert problem in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_the_command_writes_the_concepts_asked_for(tmp_path, capsys):
    assert cli.main(["recipes", "--canvas-library", str(tmp_path), "--concepts", "Nimian,striped"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canvas-nimian.toml", "canvas-style-orla-venn.toml",
                                                          "dt_lora.json"]


class _ReadsAs:
    """An evaluator stand-in that reads each image as the reading at its index."""

    def __init__(self, readings):
        self.readings = readings

    def read(self, images):
        return self.readings[: len(images)]


def test_the_canvas_scorer_counts_a_neighbour_drawn_in_a_characters_place_as_the_neighbour(tmp_path):
    from dt_lora.canvas.evaluator import Reading

    first, neighbour = world.characters()[0], world.characters()[1]
    path = recipes.write_library(tmp_path, [first.name])[0]
    scorer = CanvasScorer.__new__(CanvasScorer)
    scorer.evaluator = _ReadsAs([Reading(first.look, first.name, 1.0), Reading(neighbour.look, neighbour.name, 1.0),
                                 Reading(None, "none", 1.0)])
    assert scorer.shows_target([0, 0, 0], load_recipe(path)).tolist() == [True, False, False]

    described = world.Look("circle", "red", "striped")
    scorer.evaluator = _ReadsAs([Reading(first.look, first.name, 1.0), Reading(neighbour.look, neighbour.name, 1.0),
                                 Reading(described, "none", 1.0), Reading(world.Look("circle", "red"), "none", 1.0)])
    prompts = [f"a picture of {first.name}", f"a picture of {first.name}", world.description_prompt(described),
               world.description_prompt(described)]
    assert scorer.preservation([0] * 4, prompts) == {first.name: 0.5, described.describe(): 0.5}


def test_canvas_recipes_are_scored_by_the_canvas_evaluator_and_refused_when_they_name_no_one(tmp_path, monkeypatch):
    from dt_lora.evaluate import scorers

    monkeypatch.setattr(CanvasScorer, "__init__", lambda self: None)
    library = [load_recipe(p) for p in recipes.write_library(tmp_path, ["Nimian", "dotted"])]
    assert isinstance(scorers.choose_scorer(library), CanvasScorer)
    mixed = tmp_path / "mixed.toml"
    mixed.write_text('name = "mixed"\nbase = "canvas"\n[target]\nprompts = ["Nimian", "Rufano"]\n[anchors]\nprompts = ["a red circle"]\n')
    with pytest.raises(ValueError, match="do not all name one canvas character"):
        CanvasScorer.concept(load_recipe(mixed))


def test_a_recipe_the_user_wrote_is_never_replaced_and_the_librarys_own_only_with_overwrite(tmp_path, capsys):
    args = ["recipes", "--canvas-library", str(tmp_path), "--concepts", "Nimian"]
    mine = tmp_path / "canvas-nimian.toml"
    mine.write_text("# my edits\n")
    assert cli.main(args + ["--overwrite"]) == 2
    assert "was not written by dt-lora" in capsys.readouterr().err
    assert mine.read_text() == "# my edits\n"

    mine.unlink()
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    mine.write_text(mine.read_text() + "# changed by the library's next run\n")
    assert cli.main(args + ["--overwrite"]) == 0
    assert "changed by" not in mine.read_text() and load_recipe(mine).name == "canvas-nimian"
