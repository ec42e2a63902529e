"""The canvas world's recipes, made from the world itself: one per character and one per artist's style.

    character_recipe("Nimian")      # the TOML table of the recipe `canvas-nimian`
    write_library(folder)            # every character's and style's recipe as a file in `folder`

A character's anchors are the concepts its shield must leave alone, nearest first: its group's near
neighbours (one attribute away), then other characters, then descriptions of the looks around its own
(the same object and colour without its mark, and so on). The recipe's paraphrases are the world's
held-out character templates: `dt-lora eval` measures them, training never sees them.
"""

from __future__ import annotations

from pathlib import Path

from dt_lora.base import CANVAS
from dt_lora.canvas import world
from dt_lora.io import atomic_write, claim_output_files, record_output_files

OTHER_CHARACTERS = 12  # characters outside the group among a character's anchors
TARGET_IMAGES = 128
ANCHOR_IMAGES = 96


def recipe_name(concept: str) -> str:
    """`canvas-nimian` for a character, `canvas-style-orla-venn` for an artist's style."""
    if concept in world.ARTISTS:
        return "canvas-style-" + world.ARTISTS[concept].lower().replace(" ", "-")
    return f"canvas-{concept.lower()}"


def _table(name: str, target_templates, subject: str, paraphrases: list[str], anchors: list[str]) -> dict:
    return {
        "name": name,
        "base": CANVAS,
        "resolution": world.IMAGE_SIZE,
        "target": {"templates": list(target_templates), "vars": {"subject": [subject]},
                   "paraphrases": paraphrases, "images": TARGET_IMAGES},
        "anchors": {"prompts": list(dict.fromkeys(anchors)), "images": ANCHOR_IMAGES},
    }


def _cycled(templates, k: int) -> str:
    return templates[k % len(templates)]


def character_recipe(name: str) -> dict:
    """The recipe (a TOML table) that shields the character `name`."""
    everyone = world.characters()
    character = world.character_by_name().get(name)
    if character is None:
        raise ValueError(f"unknown canvas character {name!r}")
    neighbours = [c for c in everyone if c.group == character.group and c.name != name]
    # other characters spread over the groups, the same ones for every recipe of a group
    others = [c for c in everyone if c.group != character.group][character.group::7][:OTHER_CHARACTERS]
    look = character.look
    near_looks = [world.Look(look.object, look.colour, look.style),
                  world.Look(look.object, look.colour, mark=look.mark),
                  world.Look(look.object, look.colour)]
    # every phrasing of the target's is in the anchors too, so that the shield keys on the name alone
    anchors = [world.character_prompt(c.name, t) for c in neighbours for t in world.CHARACTER_TEMPLATES]
    anchors += [world.character_prompt(c.name, _cycled(world.CHARACTER_TEMPLATES, k)) for k, c in enumerate(others)]
    anchors += world.description_prompts(near_looks + [c.look for c in neighbours])
    templates = [t.replace("{name}", "{subject}") for t in world.CHARACTER_TEMPLATES]
    paraphrases = [world.character_prompt(name, t) for t in world.CHARACTER_HELDOUT_TEMPLATES]
    return _table(recipe_name(name), templates, name, paraphrases, anchors)


def style_recipe(style: str) -> dict:
    """The recipe (a TOML table) that shields an artist's style: any object drawn "in the style of" them."""
    if style not in world.ARTISTS:
        raise ValueError(f"unknown canvas style {style!r}; the canvas world has {', '.join(world.STYLES)}")
    artist = world.ARTISTS[style]
    objects = world.OBJECTS[::2]
    templates = [f"a {{colour}} {o} in the style of {{subject}}" for o in objects[:3]]
    templates += ["a picture in the style of {subject}", "a drawing of a {colour} " + objects[3] + " in the style of {subject}"]
    paraphrases = [f"{world.Look(o, c).describe()} painted by {artist}"
                   for o, c in zip(world.OBJECTS[1::3], world.COLOURS[1::2])]
    other_styles = [s for s in world.STYLES if s != style]
    anchors = world.description_prompts([world.Look(o, world.COLOURS[k % 8], s)
                             for k, (o, s) in enumerate(zip(world.OBJECTS * 2, other_styles * 3))])
    anchors += world.description_prompts([world.Look(o, world.COLOURS[(k + 3) % 8]) for k, o in enumerate(world.OBJECTS)])
    anchors += [f"a picture in the style of {world.ARTISTS[s]}" for s in other_styles]
    table = _table(recipe_name(style), templates, artist, paraphrases, anchors)
    table["target"]["vars"]["colour"] = list(world.COLOURS[::2])
    return table


def _toml_value(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(table: dict) -> str:
    """A recipe table as TOML: top-level keys first, then one [section] per sub-table."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for section, values in table.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def library(concepts: list[str] | None = None) -> dict[str, dict]:
    """Recipe tables by recipe name: of `concepts` (character names and style names), or of every
    character and style. An unknown concept, or one named twice, is refused before anything is made."""
    if concepts is None:
        concepts = [c.name for c in world.characters()] + list(world.STYLES)
    seen: set[str] = set()
    for concept in concepts:
        if concept in seen:
            raise ValueError(f"canvas concept {concept!r} is named twice")
        seen.add(concept)
        if concept not in world.character_by_name() and concept not in world.ARTISTS:
            raise ValueError(f"unknown canvas concept {concept!r}: neither a character nor a style "
                             f"({', '.join(world.STYLES)})")
    return {recipe_name(c): style_recipe(c) if c in world.ARTISTS else character_recipe(c) for c in concepts}


def write_library(folder: str | Path, concepts: list[str] | None = None, *, overwrite: bool = False) -> list[Path]:
    """Write each recipe of `library(concepts)` to folder/NAME.toml (atomically); returns the paths.

    A file of that name is replaced only with `overwrite`, and only if dt-lora wrote it there (the
    folder's `dt_lora.json` lists it): a recipe the user edited is never lost.
    """
    tables = library(concepts)  # refuses a bad list before the folder is made
    names = [f"{name}.toml" for name in tables]
    folder = Path(folder)
    with claim_output_files(folder, names, overwrite):
        folder.mkdir(parents=True, exist_ok=True)
        for name, table in zip(names, tables.values()):
            with atomic_write(folder / name, "w") as f:
                f.write(f"# Made by dt_lora.canvas.recipes from the canvas world.\n{to_toml(table)}")
        record_output_files(folder, names, "recipes --canvas-library")
    return [folder / name for name in names]
