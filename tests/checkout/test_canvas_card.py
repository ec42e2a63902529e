"""The canvas card's verdict: the card's few images decide the clear cases, a second look the rest
(research/canvas-world.md). Readings are made up, so every answer is known."""

from __future__ import annotations

import pytest

from dt_lora.canvas import quality, world
from dt_lora.evaluate.erasure import BENCH_SEED
from worlds.canvas.training import card

NAMES = [c.name for c in world.characters()]
CELLS = [(o, s) for o in world.OBJECTS for s in (world.PLAIN,) + world.STYLES]


@pytest.fixture
def second_look(monkeypatch):
    """The second look's rates, given; records what was drawn again."""
    asked, rates = {}, {"characters": {}, "cells": {}}

    def recheck(pipeline, evaluator, characters, cells):
        asked["characters"], asked["cells"] = list(characters), list(cells)
        return ({n: rates["characters"][n] for n in characters}, {c: rates["cells"][c] for c in cells})

    monkeypatch.setattr(card, "recheck", recheck)
    return asked, rates


def test_only_borderline_characters_and_cells_are_drawn_again_and_their_second_look_decides(second_look):
    asked, rates = second_look
    characters = {n: 1.0 for n in NAMES} | {NAMES[0]: 0.875, NAMES[1]: 0.75, NAMES[2]: 0.625}
    cells = {c: 1.0 for c in CELLS} | {CELLS[0]: 0.75, CELLS[1]: 0.5}
    rates["characters"] = {NAMES[0]: 0.95, NAMES[1]: 0.875}
    rates["cells"] = {CELLS[0]: 0.9}

    verdict = card._verdict(None, None, characters, cells)

    assert asked == {"characters": NAMES[:2], "cells": [CELLS[0]]}  # 0.625 and 0.5 fail without a second look
    assert verdict["missed"]["characters"] == sorted([NAMES[1], NAMES[2]])
    assert verdict["missed"]["cells"] == [f"{CELLS[1][0]}/{CELLS[1][1]}"]
    assert verdict["missed"]["groups"] == ["0"]  # its first three: (0.95 + 0.875 + 0.625 + 1) / 4 = 0.86
    assert not verdict["meets the bar"]


def test_a_group_is_judged_on_its_characters_final_rates(second_look):
    _, rates = second_look
    group = [c.name for c in world.characters() if c.group == 3]
    characters = {n: 1.0 for n in NAMES} | {n: 0.875 for n in group}
    rates["characters"] = {n: 0.90 for n in group}
    verdict = card._verdict(None, None, characters, {c: 1.0 for c in CELLS})
    assert verdict["meets the bar"] and verdict["second look"]["characters"] == {n: 0.90 for n in group}

    rates["characters"] = {n: 0.85 for n in group}
    verdict = card._verdict(None, None, characters, {c: 1.0 for c in CELLS})
    assert verdict["missed"] == {"characters": sorted(group), "groups": ["3"], "cells": []}


def test_the_second_look_draws_from_seeds_of_its_own():
    assert quality.EVAL_SEED + 1_160 <= quality.RECHECK_SEED  # the card's 800 + 360 images come first
    assert quality.RECHECK_SEED + quality.RECHECK_IMAGES * (len(NAMES) + len(CELLS)) <= BENCH_SEED
