"""The canvas world's definition: its characters, looks, renders and prompts (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from dt_lora.canvas import world


def _differences(a: world.Look, b: world.Look) -> list[str]:
    return [name for name in ("object", "colour", "style", "mark") if getattr(a, name) != getattr(b, name)]


def test_there_are_a_hundred_characters_each_with_its_own_name_and_look():
    characters = world.characters()
    assert len(characters) == world.GROUPS * world.GROUP_SIZE == 100
    assert len({c.name for c in characters}) == 100
    assert len({c.look for c in characters}) == 100
    assert all(c.look.mark != world.NO_MARK for c in characters)


def test_each_neighbour_differs_from_its_groups_first_in_the_one_attribute_it_names():
    by_group: dict[int, list[world.Character]] = {}
    for character in world.characters():
        by_group.setdefault(character.group, []).append(character)
    assert len(by_group) == world.GROUPS
    kinds = set()
    for members in by_group.values():
        first, *neighbours = members
        assert first.differs_in is None and len(neighbours) == world.GROUP_SIZE - 1
        for neighbour in neighbours:
            assert _differences(first.look, neighbour.look) == [neighbour.differs_in]
            kinds.add(neighbour.differs_in)
    assert kinds == {"object", "colour", "style", "mark"}


def test_no_character_name_contains_a_word_of_the_world():
    words = world.OBJECTS + world.COLOURS + world.MARKS + world.STYLES
    for character in world.characters():
        assert not [w for w in words if w in character.name.lower()], character.name


def test_identity_names_the_character_of_a_look_and_none_for_any_other():
    first = world.characters()[0]
    assert world.identity(first.look) == first.name
    assert world.identity(world.Look(first.look.object, first.look.colour, first.look.style)) == world.NO_CHARACTER


def test_a_description_names_the_style_by_its_artist_only():
    look = world.Look("circle", "orange", "striped", "hat")
    assert look.describe() == "an orange circle in the style of Orla Venn wearing a hat"
    assert world.Look("circle", "red").describe() == "a red circle"
    words = " ".join(world.world_words())
    assert "striped" not in words and "orla" in words and world.characters()[0].name.lower() in words


def test_renders_are_seeded_and_every_attribute_changes_the_picture():
    a, _ = world.sample(4, seed=3, character_rate=0.5)
    b, _ = world.sample(4, seed=3, character_rate=0.5)
    assert a.dtype == np.uint8 and a.shape == (4, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert np.array_equal(a, b)

    def draw(look):
        return world.render(world.Scene(look, 0.5, (24.0, 27.0), 12.5)).astype(int)

    plain = draw(world.Look("square", "blue"))
    for changed in [world.Look("circle", "blue"), world.Look("square", "green")] + \
                   [world.Look("square", "blue", style) for style in world.STYLES] + \
                   [world.Look("square", "blue", mark=mark) for mark in world.MARKS]:
        assert np.abs(draw(changed) - plain).mean() > 1.0, changed


def test_an_unknown_attribute_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown style 'wavy'"):
        world.render(world.Scene(world.Look("circle", "red", "wavy"), 0.5, (24.0, 27.0), 12.0))


def test_training_prompts_name_the_character_or_describe_the_look():
    rng = np.random.default_rng(0)
    character = world.characters()[5]
    scene = world.random_scene(rng, character.look)
    assert scene.character == character.name
    prompts = [world.training_prompt(scene, rng, ("harbour",)) for _ in range(200)]
    by_name = [p for p in prompts if character.name in p]
    described = [p for p in prompts if character.look.describe() in p]
    assert len(by_name) + len(described) == 200 and len(by_name) > len(described) > 0
    assert 0 < sum("harbour" in p for p in prompts) < 100


def test_an_embedded_world_that_is_not_built_says_which_build_makes_it(tmp_path):
    from dt_lora.base import BaseModelNotFound, load_embedded

    with pytest.raises(BaseModelNotFound, match=r"python -m worlds\.canvas\.build --out .*canvas/model"):
        load_embedded(tmp_path / "canvas" / "model")
