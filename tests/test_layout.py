"""The package's folders are its pipeline, and its imports say so.

Every module belongs to one stage (`STAGES`, lowest first); a module imports only from its own stage or
lower ones, function-level imports included. The modules import no one in a cycle, and nothing in the
installed package imports the code that stays in the checkout (research, benchmarks, building the worlds).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "dt_lora"
CHECKOUT_ONLY = ("research", "bench", "worlds")  # top-level folders of the checkout, not in the wheel

# Lowest first: the shared plumbing under everything, then each stage consumes what the ones before it
# make. The package's own `__init__` re-exports the scramble API, so it sits with it.
STAGES = [
    ("plumbing", ("dt_lora._version", "dt_lora.errors", "dt_lora.io", "dt_lora.distributed", "dt_lora.tensorfiles")),
    ("scramble", ("dt_lora", "dt_lora.images", "dt_lora.scramble", "dt_lora._native")),
    ("base model", ("dt_lora.base",)),
    ("recipe", ("dt_lora.recipe", "dt_lora.recipes")),
    ("data", ("dt_lora.data",)),
    ("adapter files", ("dt_lora.adapters",)),
    ("worlds", ("dt_lora.toy", "dt_lora.canvas")),
    ("prompt search", ("dt_lora.search",)),
    ("shield training", ("dt_lora.shield",)),
    ("evaluation and red team", ("dt_lora.evaluate",)),
    ("front ends", ("dt_lora.demo", "dt_lora.cli", "dt_lora.__main__")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
EXTENSIONS = {"dt_lora._native"}  # the Rust core, built by maturin


def stage_of(module: str) -> int:
    """The stage of `module`: the longest prefix listed in `STAGES` that names it or a package above it."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    if index is None:
        raise AssertionError(f"{module} is in no stage of tests/test_layout.py's STAGES: place it")
    return index


def imports_of(module: str) -> set[str]:
    """Every module `module` imports, at module level or inside functions, as full module names."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from dt_lora.shield import guard` imports the module dt_lora.shield.guard (and runs the package's
            # __init__, which is a stage of its own only for the names it defines)
            submodules = {f"{source}.{alias.name}" for alias in node.names
                          if f"{source}.{alias.name}" in MODULES.keys() | EXTENSIONS}
            found |= submodules
            if len(submodules) < len(node.names):
                found.add(source)
    return found


def test_every_module_is_placed_in_a_stage():
    for module in MODULES:
        stage_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_pipeline(module):
    own = stage_of(module)
    upward = [f"{imported} ({STAGES[stage_of(imported)][0]})" for imported in sorted(imports_of(module))
              if imported.split(".")[0] == "dt_lora" and imported in MODULES and stage_of(imported) > own]
    assert not upward, f"{module} ({STAGES[own][0]}) imports from a later stage: {', '.join(upward)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_package_does_not_import_checkout_only_code(module):
    outside = sorted(name for name in imports_of(module) if name.split(".")[0] in CHECKOUT_ONLY)
    assert not outside, f"{module} imports {', '.join(outside)}, which is not in the installed package"


def test_no_import_cycle():
    graph = {module: {name for name in imports_of(module) if name in MODULES and name != module}
             for module in MODULES}
    # a package's __init__ is imported with each of its modules; importing a module of your own package
    # is not a cycle through the package unless the package's __init__ imports you back
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_checks_see_a_violation():
    """The parser finds function-level and `from package import module` imports, so the checks can fail."""
    imports = imports_of("dt_lora.shield.adversarial")
    assert "dt_lora.search" in imports  # imported inside train_adversarial
    assert stage_of("dt_lora.evaluate.attack") > stage_of("dt_lora.shield.train")
    assert "dt_lora.distributed" in imports_of("dt_lora.data")  # `from dt_lora import distributed`


def test_every_error_class_derives_from_one_of_the_two_documented_bases():
    """errors.py documents two bases, and the command's exit code depends on which: 2 (UserError) or 1."""
    import importlib
    import inspect

    from dt_lora.errors import RuntimeFailure, UserError

    strays = []
    for module in sorted(MODULES):
        if module.endswith("__main__"):
            continue
        for name, obj in vars(importlib.import_module(module)).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module
                    and obj not in (UserError, RuntimeFailure) and not issubclass(obj, (UserError, RuntimeFailure))):
                strays.append(f"{module}.{name}")
    assert not strays, f"error classes outside UserError / RuntimeFailure: {', '.join(strays)}"
