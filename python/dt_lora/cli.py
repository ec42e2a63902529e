"""The `dt-lora` command line.

Each subcommand is a pair: `add_<name>_command(subparsers)` declares its
arguments and `run_<name>(args) -> int` calls the library. To add one, write
the pair and list the adder in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dt_lora import __version__

EXIT_USAGE = 2  # same code argparse uses for bad arguments


def _grid_arg(text: str) -> int | tuple[int, int]:
    """`4` -> 4, `2x3` -> (2, 3)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"expected N or ROWSxCOLS, got {text!r}")


# ---------------------------------------------------------------- scramble


def add_scramble_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "scramble",
        help="scramble a folder of images into Scrambled Grids",
        description=(
            "Cut every PNG/JPEG in IN_DIR into a grid of tiles, shuffle the tiles and write "
            "PNGs with the same names to OUT_DIR. Images are taken in name order and image i "
            "uses random stream i, so the output is reproducible for a given --seed."
        ),
    )
    parser.add_argument("in_dir", type=Path, metavar="IN_DIR", help="folder of PNG/JPEG images")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder for the scrambled PNGs")
    parser.add_argument("--grid", type=_grid_arg, default=4, help="tiles per side, N or ROWSxCOLS (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--flips", action="store_true", help="also flip/transpose tiles at random")
    parser.add_argument(
        "--no-derange", dest="derange", action="store_false", help="allow tiles to stay in place"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in OUT_DIR")
    parser.set_defaults(run=run_scramble)


def run_scramble(args: argparse.Namespace) -> int:
    from dt_lora.scramble import scramble_folder

    written = scramble_folder(
        args.in_dir,
        args.out_dir,
        args.grid,
        args.seed,
        derange=args.derange,
        flips=args.flips,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(written)} scrambled image(s) to {args.out_dir}")
    return 0


# ---------------------------------------------------------------- train


def _recipe_flag(dotted: str) -> str:
    return "--" + dotted.replace(".", "-").replace("_", "-")


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    from typing import get_origin

    from dt_lora.recipe import override_keys

    parser = subparsers.add_parser(
        "train",
        help="train a concept's shield (Degeneration-Tuning) into a LoRA adapter",
        description=(
            "Generate images of the concept with the base model, scramble them into Scrambled "
            "Grids, cache their latents, and train a LoRA adapter on the UNet's attention layers "
            "so that the concept's prompts draw tile soup while anchor prompts draw as before. "
            "Re-running the same command resumes an interrupted run. Every recipe key can be set "
            "with a flag --<section>-<key> (lists comma-separated)."
        ),
    )
    parser.add_argument("recipe", type=Path, nargs="?", metavar="RECIPE", help="concept recipe (.toml)")
    parser.add_argument("-o", "--out", type=Path, help="adapter file (default: <recipe folder>/<name>.safetensors)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".dt-lora-cache"),
                        help="where generated data and latents are cached (default: .dt-lora-cache)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapter file")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    recipe_flags = parser.add_argument_group("recipe keys (override the file)")
    for dotted, annotation in override_keys():
        if get_origin(annotation) is dict:
            continue  # template variables are tables: set them in the file
        recipe_flags.add_argument(_recipe_flag(dotted), dest=f"set:{dotted}", metavar="VALUE", default=None)
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from dt_lora.recipe import load_recipe
    from dt_lora.train import TrainingDiverged, train_adapter

    overrides = {k[len("set:"):]: v for k, v in vars(args).items() if k.startswith("set:") and v is not None}
    recipe = load_recipe(args.recipe, overrides)
    out = args.out or (args.recipe.parent if args.recipe else Path(".")) / f"{recipe.name}.safetensors"
    try:
        result = train_adapter(recipe, out, cache_dir=args.cache_dir, overwrite=args.overwrite,
                               progress=not args.quiet)
    except TrainingDiverged as error:
        print(f"dt-lora train: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dt-lora train: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"wrote {result.adapter} ({result.steps} steps, {result.seconds:.0f} s"
          + (f", resumed from step {result.resumed_from}" if result.resumed_from else "") + ")")
    return 0


# ---------------------------------------------------------------- entry point

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_scramble_command, add_train_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dt-lora",
        description="Shield concepts in Stable Diffusion by Degeneration-Tuning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Expected failures (bad input,
    missing files) print one line to stderr and return 2, no traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:
        print(f"dt-lora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
