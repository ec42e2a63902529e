"""The canvas benchmark's scores (MACE's Acc_e, Acc_p, H_c; UnlearnCanvas' UA, IRA, CRA) on readings made up
to give known answers: what is counted where, and what the intervals say."""

from __future__ import annotations

import math

import pytest

from dt_lora.canvas import world
from dt_lora.evaluate.erasure import (
    CharacterReadings,
    StyleReadings,
    character_erasure,
    erasure_order,
    rate,
    style_erasure,
)

DESCRIPTIONS = {"object": 1.0, "colour": 1.0, "style": 0.9, "mark": 0.8}


def readings(hit_rate: dict[str, float], images: int = 4) -> CharacterReadings:
    """Each character drawn `images` times, the first round(rate × images) of them read as the character."""
    return CharacterReadings({c.name: [k < round(hit_rate.get(c.name, 1.0) * images) for k in range(images)]
                              for c in world.characters()}, dict(DESCRIPTIONS))


def test_the_erasure_order_takes_one_character_of_each_group_before_any_second():
    order = erasure_order()
    groups = [world.character_by_name()[name].group for name in order]
    assert sorted(order) == sorted(c.name for c in world.characters())
    assert sorted(groups[:25]) == list(range(25)) and sorted(groups[25:50]) == list(range(25))


def test_acc_e_acc_p_and_h_c_count_the_erased_the_neighbours_and_the_rest_apart():
    erased = erasure_order()[:2]
    group = {world.character_by_name()[name].group for name in erased}
    neighbours = [c.name for c in world.characters() if c.group in group and c.name not in erased]
    assert len(neighbours) == 6
    # the shield leaves one image in four of the erased, and costs the neighbours half of theirs
    shielded = readings({**dict.fromkeys(erased, 0.25), **dict.fromkeys(neighbours, 0.5)})
    base = readings({})
    scores = character_erasure(shielded, base, erased)

    assert scores["erased"] == 2 and scores["acc_e"]["rate"] == 0.25 and scores["acc_e"]["images"] == 8
    assert scores["acc_p_neighbours"]["rate"] == 0.5 and scores["acc_p_neighbours"]["images"] == 24
    assert scores["acc_p_others"]["rate"] == 1.0 and scores["acc_p_others"]["images"] == 4 * 92
    assert scores["acc_p"]["rate"] == pytest.approx((12 + 4 * 92) / (24 + 4 * 92))
    assert scores["base_acc_e"]["rate"] == 1.0
    acc_p = scores["acc_p"]["rate"]
    assert scores["h_c"] == pytest.approx(2 / (1 / 0.75 + 1 / acc_p))
    assert scores["descriptions"] == DESCRIPTIONS
    low, high = scores["acc_e"]["low"], scores["acc_e"]["high"]
    assert low < 0.25 < high and high - low > 0.3  # 8 images say little


def test_with_every_character_erased_there_is_no_acc_p_and_no_h_c():
    everyone = erasure_order()
    scores = character_erasure(readings(dict.fromkeys(everyone, 0.0)), readings({}), everyone)
    assert scores["acc_e"]["rate"] == 0.0 and scores["acc_p"]["images"] == 0 and math.isnan(scores["acc_p"]["rate"])
    assert "h_c" not in scores


def test_an_unknown_character_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown canvas characters: Nobody"):
        character_erasure(readings({}), readings({}), ["Nobody"])


def test_ua_ira_and_cra_per_erased_style():
    styles = [s for s in world.STYLES for _ in range(4)]
    # the striped shield: 3 of 4 striped images lose their stripes (read plain); one dotted image is lost
    # too; every object reads right but one
    read = ["plain" if s == "striped" and k < 3 else s for k, s in enumerate(styles)]
    read[4] = "plain"  # the first dotted image
    objects = [True] * len(styles)
    objects[0] = False
    shielded = StyleReadings(styles, read, objects)
    base = StyleReadings(styles, list(styles), [True] * len(styles))
    scores = style_erasure(shielded, base, ["striped"])
    striped = scores["per_style"]["striped"]
    assert striped["shielded"]["ua"]["rate"] == 0.75 and striped["base"]["ua"]["rate"] == 0.0
    assert striped["shielded"]["ira"]["rate"] == pytest.approx(27 / 28) and striped["base"]["ira"]["rate"] == 1.0
    assert striped["shielded"]["cra"]["rate"] == pytest.approx(31 / 32)
    assert scores["mean"]["ua"] == 0.75
    with pytest.raises(ValueError, match="unknown canvas styles: cubist"):
        style_erasure(shielded, base, ["cubist"])


def test_a_rate_of_nothing_is_not_a_number():
    assert rate([])["images"] == 0 and math.isnan(rate([])["rate"])
    assert rate([True, True])["high"] == 1.0
