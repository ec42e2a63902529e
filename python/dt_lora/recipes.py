"""The concept recipes that ship with dt-lora, and the toy shields trained from them, by name: the
checkout's `adapters/*.toml` and `adapters/toy-*.safetensors` (`python -m worlds.toy.shields` trains those).

    list_recipes()              # ['sd15-character-mickey', …, 'toy-circle', …]
    recipe_path("toy-circle")   # the shipped file; a path to an existing file comes back unchanged
    adapter_path("toy-circle")  # the shipped adapter, likewise (shipped_adapter: None where none ships)

A local file named like a shipped one (`./toy-circle`) is taken instead, with a note on stderr unless it
was written as a path; a local folder of that name never hides the shipped file.

In a checkout `shipped_recipes/` is a link to `adapters/`; in a wheel it is a folder of copies
(pyproject.toml's `[tool.maturin] include`), so `dt-lora demo` and `dt-lora train toy-circle` work
from any folder after `pip install`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).parent / "shipped_recipes"


def list_recipes() -> list[str]:
    """The names of the shipped recipes, sorted."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.toml"))


def shipped_adapter(name: str) -> Path | None:
    """The shield trained from the shipped recipe `name` (`toy-circle`), if it ships."""
    path = RECIPES_DIR / f"{name.removesuffix('.safetensors')}.safetensors"
    return path if path.is_file() else None


def adapter_path(name_or_path: str | Path) -> Path:
    """The adapter file `name_or_path` means: a local file of that name, else the shipped adapter of that
    name (`toy-circle`), else `name_or_path` itself (whose reading then says what is wrong with it)."""
    path = Path(name_or_path)
    if not _is_bare_name(name_or_path):
        return path
    shipped = shipped_adapter(path.name)
    if shipped is None:
        return path
    return _local_or_shipped(path, shipped, "shield")


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: a local file `name_or_path`, else the shipped recipe of that name (`toy-circle` or
    `toy-circle.toml`)."""
    path = Path(name_or_path)
    shipped = RECIPES_DIR / f"{path.name.removesuffix('.toml')}.toml"
    if _is_bare_name(name_or_path) and shipped.is_file():
        return _local_or_shipped(path, shipped, "recipe")
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"recipe {str(name_or_path)!r} is neither a file nor a shipped recipe "
        f"({', '.join(list_recipes()) or f'none found in {RECIPES_DIR}'}; `dt-lora recipes` lists them)")


# A bare name can mean a local file or a shipped one. The user's own file comes first, but only a file: a
# folder of that name (a checkout, an output folder named after the shield) would otherwise hide the
# shipped file and fail later with an error about the folder. A file that hides a shipped one is said once
# per name on stderr; `./NAME` (a path, not a bare name) takes the local file without a word.
_shadowing_noted: set[str] = set()


def _is_bare_name(name_or_path: str | Path) -> bool:
    """True for `toy-circle`, False for `./toy-circle` or `a/toy-circle` (a Path drops a leading `./`, so
    only a string can say it)."""
    text = str(name_or_path)
    return not any(separator and separator in text for separator in (os.sep, os.altsep))


def _local_or_shipped(path: Path, shipped: Path, kind: str) -> Path:
    if not path.is_file():
        return shipped
    if path.name not in _shadowing_noted:
        _shadowing_noted.add(path.name)
        print(f"dt-lora: note: using the local file {path.name}, not the shipped {kind} of that name "
              "(`dt-lora recipes --path` shows where that one is)", file=sys.stderr)
    return path


def describe_recipes(with_paths: bool = False) -> list[str]:
    """One line per shipped recipe: name, base, its target prompts and whether its shield is shipped (and,
    `with_paths`, where the recipe and shield files are, to copy and edit them)."""
    from dt_lora.recipe import load_recipe

    recipes = {name: load_recipe(recipe_path(name)) for name in list_recipes()}
    if not recipes:
        raise FileNotFoundError("no shipped recipes found: reinstall dt-lora")
    name_width = max(len(name) for name in recipes)
    base_width = max(len(recipe.base) for recipe in recipes.values())
    lines = []
    for name, recipe in recipes.items():
        prompts = recipe.target_prompts
        line = f"{name:<{name_width}}  {recipe.base:<{base_width}}  {len(prompts)} target prompts, e.g. {prompts[0]!r}"
        shield = shipped_adapter(name)
        line += "; shield shipped" if shield else ""
        if with_paths:
            line += f"  {recipe_path(name)}" + (f"  {shield}" if shield else "")
        lines.append(line)
    return lines
