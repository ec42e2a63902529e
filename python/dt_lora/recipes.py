"""The concept recipes that ship with dt-lora, and the toy shields trained from them, by name: the
checkout's `adapters/*.toml` and `adapters/toy-*.safetensors` (`python -m dt_lora.toy.shields` trains those).

    list_recipes()              # ['sd15-character-mickey', …, 'toy-circle', …]
    recipe_path("toy-circle")   # the shipped file; a path to an existing file comes back unchanged
    adapter_path("toy-circle")  # the shipped adapter, likewise (shipped_adapter: None where none ships)

In a checkout `shipped_recipes/` is a link to `adapters/`; in a wheel it is a folder of copies
(pyproject.toml's `[tool.maturin] include`), so `dt-lora demo` and `dt-lora train toy-circle` work
from any folder after `pip install`.
"""

from __future__ import annotations

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
    """`name_or_path` itself unless it is missing and names a shipped adapter (`toy-circle`)."""
    path = Path(name_or_path)
    if not path.exists() and path.parent == Path("."):
        return shipped_adapter(path.name) or path
    return path


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: `name_or_path` itself if it is a file, else the shipped recipe of that name
    (`toy-circle` or `toy-circle.toml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent == Path("."):  # a bare name: the shipped recipe of that name
        shipped = RECIPES_DIR / f"{path.name.removesuffix('.toml')}.toml"
        if shipped.is_file():
            return shipped
    raise FileNotFoundError(
        f"recipe {str(name_or_path)!r} is neither a file nor a shipped recipe "
        f"({', '.join(list_recipes()) or f'none found in {RECIPES_DIR}'}; `dt-lora recipes` lists them)")
