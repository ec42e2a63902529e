"""How strongly each of a shield's key words alone answers its text-local directions (`locality.lone_word_responses`).

    python -m research.key_words

A "blue square" shield on the toy, with anchors that name no other blue thing, and then with anchors that
name no square of another colour. Each key word is put alone into 64 random prompts without the others;
its answer is printed as a share of the concept's own prompts'. `dt-lora train` warns at 0.5 or more.
No shield is trained: the directions come from the prompts and the text encoder alone.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

RECIPE = """name = "blue-square"
base = "toy"
[target]
templates = ["a blue square", "a photo of a blue square", "a drawing of a blue square", "blue square"]
[anchors]
templates = ["a {colour} {shape}", "a photo of a {colour} {shape}", "{colour} {shape}"]
vars = { colour = %s, shape = %s }
"""
CASES = {
    "no other blue thing among the anchors": (["red", "green", "yellow", "purple"], ["square", "circle", "star"]),
    "no square of another colour among the anchors": (["red", "green", "blue", "yellow", "purple"], ["circle", "star"]),
}


def blue_square_key_words(pipeline, folder: Path, colours, shapes):
    """(recipe, each key word's answer alone) of the blue square whose anchors are every (colour, shape) of
    `colours` × `shapes`; the recipe is written into `folder`. tests/shield/test_locality.py checks it too."""
    from dt_lora.recipe import load_recipe
    from dt_lora.shield.locality import encode_direction_prompts, lone_word_responses, shield_directions

    path = Path(folder) / "blue-square.toml"
    path.write_text(RECIPE % (list(colours), list(shapes)))
    recipe = load_recipe(path)
    encoded = encode_direction_prompts(pipeline, recipe)
    return recipe, lone_word_responses(pipeline, recipe, shield_directions(pipeline, recipe, encoded),
                                       encoded[0].embeds)


def main() -> None:
    from dt_lora import toy

    pipeline = toy.load()
    with tempfile.TemporaryDirectory() as folder:
        for case, (colours, shapes) in CASES.items():
            _, shares = blue_square_key_words(pipeline, folder, colours, shapes)
            print(f"{case}: " + ", ".join(f"{word} {share:.2f}" for word, share in shares.items()))


if __name__ == "__main__":
    main()
