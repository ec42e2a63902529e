"""Train the shipped toy shields: `python -m dt_lora.toy.shields [CONCEPT ...]`.

Each shipped toy recipe `adapters/toy-<concept>.toml` gets its adapter `adapters/toy-<concept>.safetensors`,
trained on the toy model with the recipe as it is (its seed makes the run reproducible). They ship so
that a shield can be tried without training one (`dt-lora generate --adapter toy-circle`) and so that
the tests load them instead of training four shields per run. Rerun this after changing a toy recipe,
the toy model or the training code: the test suite checks that the shipped files still match their
recipes, and that training toy-circle again gives its shipped weights.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ..recipes import RECIPES_DIR, list_recipes


def train_shipped(concepts: list[str] | None = None, out: Path = RECIPES_DIR, log=print) -> list[Path]:
    """Train the shipped recipe `toy-<concept>` (every toy recipe by default) into `out/toy-<concept>.safetensors`."""
    from ..recipe import load_recipe
    from ..train import train_adapter
    from . import load

    names = [f"toy-{c}" for c in concepts] if concepts else [n for n in list_recipes() if n.startswith("toy-")]
    pipeline = load()
    written = []
    with tempfile.TemporaryDirectory(prefix="dt-lora-shields-") as cache:
        for name in names:
            started = time.perf_counter()
            path = out / f"{name}.safetensors"
            train_adapter(load_recipe(RECIPES_DIR / f"{name}.toml"), path, cache_dir=cache, pipeline=pipeline,
                          progress=False, overwrite=True)
            log(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dt_lora.toy.shields", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concepts", nargs="*", help="e.g. circle red (default: every toy recipe)")
    parser.add_argument("--out", type=Path, default=RECIPES_DIR,
                        help="folder for the adapters (default: the checkout's adapters/, beside the recipes)")
    args = parser.parse_args(argv)
    train_shipped(args.concepts or None, args.out)


if __name__ == "__main__":
    main()
