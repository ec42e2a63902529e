"""Train the shipped toy shields: `python -m worlds.toy.shields [CONCEPT ...]`.

Each shipped toy recipe `adapters/toy-<concept>.toml` gets its adapter `adapters/toy-<concept>.safetensors`,
trained on the toy model with the recipe as it is (its seed makes the run reproducible). They ship so
that a shield can be tried without training one (`dt-lora generate --adapter toy-circle`) and so that
the tests load them instead of training four shields per run. Rerun this after changing a toy recipe,
the toy model or the training code: the test suite checks that the shipped files still match their
recipes, and that training toy-circle again gives its shipped weights.

`--base toy-sdxl --out tests/data/sdxl-shields circle red` trains the same recipes on the toy SDXL: the
tests' copies of what `dt-lora demo --base toy-sdxl` trains.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dt_lora.recipes import RECIPES_DIR, list_recipes


def train_shipped(concepts: list[str] | None = None, out: Path = RECIPES_DIR, base: str = "toy",
                  log=print) -> list[Path]:
    """Train the shipped recipe `toy-<concept>` (every toy recipe by default) on `base` (toy or toy-sdxl)
    into `out/toy-<concept>.safetensors`."""
    from dt_lora.base import load_pipeline
    from dt_lora.recipe import load_recipe
    from dt_lora.shield.train import train_adapter

    names = [f"toy-{c}" for c in concepts] if concepts else [n for n in list_recipes() if n.startswith("toy-")]
    pipeline = load_pipeline(base)
    written = []
    with tempfile.TemporaryDirectory(prefix="dt-lora-shields-") as cache:
        for name in names:
            started = time.perf_counter()
            path = out / f"{name}.safetensors"
            recipe = load_recipe(RECIPES_DIR / f"{name}.toml", {"base": base})
            train_adapter(recipe, path, cache_dir=cache, pipeline=pipeline, progress=False, overwrite=True)
            log(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worlds.toy.shields", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concepts", nargs="*", help="e.g. circle red (default: every toy recipe)")
    parser.add_argument("--out", type=Path, default=RECIPES_DIR,
                        help="folder for the adapters (default: the checkout's adapters/, beside the recipes)")
    parser.add_argument("--base", choices=["toy", "toy-sdxl"], default="toy")
    args = parser.parse_args(argv)
    unknown = [c for c in args.concepts if f"toy-{c}" not in list_recipes()]
    if unknown:
        parser.error(f"no shipped recipe toy-{unknown[0]}.toml in {RECIPES_DIR}")
    args.out.mkdir(parents=True, exist_ok=True)
    train_shipped(args.concepts or None, args.out, args.base)


if __name__ == "__main__":
    main()
