"""The `dt-lora` command line.

Each subcommand is a pair: `add_<name>_command(subparsers)` declares its
arguments and `run_<name>(args) -> int` calls the library. To add one, write
the pair and list the adder in `COMMANDS`. Options several commands share
(`--base`, `--adapter`, `--overwrite`) are declared by the `_add_*_argument`
helpers, so they mean the same everywhere.

Exit codes (see `dt_lora.errors`): 0 done, 2 user error, 1 runtime failure,
130 interrupted. Expected errors print one line `dt-lora CMD: error: ...`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from dt_lora._version import __version__
from dt_lora.base.generate import MAX_SEED
from dt_lora.errors import EXIT_INTERRUPTED, EXIT_USER, UserError, exit_code, one_line
from dt_lora.recipes import adapter_path

EXIT_USAGE = EXIT_USER  # same code argparse uses for bad arguments


def _grid_arg(text: str) -> int | tuple[int, int]:
    """`4` -> 4, `2x3` -> (2, 3); each side at least 1. A 1x1 grid depends on --no-derange, which an
    argument type cannot see: scramble_folder refuses it (GridError, exit 2) before reading any image."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or ROWSxCOLS, got {text!r}")
    if min(parts) < 1:
        raise argparse.ArgumentTypeError(f"tiles per side must be at least 1, got {text!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _count(at_most: int, at_least: int = 1) -> Callable[[str], int]:
    """A count (images, sampler steps, a rank) from `at_least` to `at_most`, refused before any work: 0 sampler
    steps divide by zero inside diffusers, and a typo's 10**12 images would allocate for hours before failing."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not at_least <= value <= at_most:
            raise argparse.ArgumentTypeError(f"must be from {at_least} to {at_most:,}, got {value:,}")
        return value

    return parse


_at_least_one = _count(1_000_000)
_images = _count(100_000)  # images a command draws: days of work on a GPU already
_sampler_steps = _count(1000)  # a sampler takes at most one step per training timestep (SD: 1000)
_search_steps = _count(1_000_000, at_least=0)


def _finite(text: str) -> float:
    """A number that is not NaN or infinite: `float()` takes 'nan', and a NaN guidance silently turns
    guidance off (every comparison with it is false), a NaN weight draws black images."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _guidance(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    """A seed from 0 to 2**63 - 1 (image files are named by seed, so a negative one would be '-00005.png')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**63 - 1, got {value}")
    return value


def _budgets(text: str) -> tuple[int, ...]:
    """Ascending step counts, e.g. "100,300,1000"."""
    try:
        budgets = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if any(b < 1 or b > 100_000 for b in budgets) or list(budgets) != sorted(set(budgets)):
        raise argparse.ArgumentTypeError(f"expected ascending step counts from 1 to 100000, got {text!r}")
    return budgets


def _weights_arg(text: str) -> list[float]:
    """`1,0.5` -> [1.0, 0.5]."""
    try:
        return [_finite(w) for w in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}") from None


def _adapter_arg(text: str) -> tuple[Path, float]:
    """`a.safetensors` or `a.safetensors:0.8` -> (path, weight); a shipped adapter's name (`toy-circle`) works too."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            if adapter_path(path).is_file() and not adapter_path(text).exists():
                raise argparse.ArgumentTypeError(f"{text}: the weight after ':' must be a number, got {weight!r}")
        else:
            if not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"{text}: the weight after ':' must be a finite number, got {weight!r}")
            return adapter_path(path), value
    return adapter_path(text), 1.0


# ---------------------------------------------------------------- shared options


def _add_base_arguments(parser: argparse.ArgumentParser) -> None:
    """`--base` and `--allow-pickle` (base models load from .safetensors only unless trusted)."""
    parser.add_argument("--base", default="toy", help="toy (default), toy-sdxl, a diffusers folder (SD 1.x, 2.x or "
                        "SDXL), or a Hub id")
    parser.add_argument("--allow-pickle", action="store_true", default=None,
                        help="also load pickled .bin/.ckpt weights (only for a model you trust: unpickling "
                        "can run code); or set DT_LORA_ALLOW_PICKLE=1")


def _add_adapter_argument(parser, *, required: bool = False, help: str = "a shield adapter; repeat to stack several"):
    parser.add_argument("--adapter", type=_adapter_arg, action="append", default=None if required else [],
                        required=required, metavar="FILE[:WEIGHT]",
                        help=f"{help} (a file, or a shipped toy shield's name: toy-circle)")


def _add_measurement_arguments(parser: argparse.ArgumentParser) -> None:
    """What `eval` and `attack` measure: --recipe, -o, the base, and the shield (adapters or a baked model)."""
    parser.add_argument("--recipe", type=Path, action="append", required=True,
                        help="a shield's recipe (.toml), or a shipped recipe's name (`dt-lora recipes`); repeat")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR")
    _add_base_arguments(parser)
    shield = parser.add_mutually_exclusive_group(required=True)
    _add_adapter_argument(shield, help="a shield adapter stacked on the base; repeat")
    shield.add_argument("--shielded", metavar="MODEL", help="a baked model (diffusers folder) instead of adapters")


def _add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output that dt-lora wrote (never anything else)")


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
    parser.add_argument("--grid", type=_grid_arg, default=4, help="tiles per side, N or ROWSxCOLS; at least 2 tiles unless "
                        "--no-derange (default: 4)")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    parser.add_argument("--flips", action="store_true", help="also flip/transpose tiles at random")
    parser.add_argument(
        "--no-derange", dest="derange", action="store_false",
        help="allow tiles to stay in place (a 1x1 grid then copies the image)"
    )
    _add_overwrite_argument(parser)
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
            "with a flag --<section>-<key> (lists comma-separated). Several GPUs: `accelerate launch "
            "--multi_gpu --num_processes N -m dt_lora train ...` splits the data generation between "
            "the processes and trains data-parallel (effective batch N × train.batch_size); with "
            "--library, the processes share the concepts out, one concept per process."
        ),
    )
    concepts = parser.add_mutually_exclusive_group()
    concepts.add_argument("recipe", type=Path, nargs="?", metavar="RECIPE",
                          help="concept recipe (.toml), or a shipped recipe's name (`dt-lora recipes`)")
    concepts.add_argument("--library", type=Path, metavar="FOLDER",
                          help="train every recipe (*.toml) in FOLDER, the base loaded once, one line per concept; "
                          "then merge them exactly into <out>/merged.safetensors (e.g. `dt-lora recipes "
                          "--canvas-library FOLDER`). The recipe flags below apply to each")
    parser.add_argument("-o", "--out", type=Path, help="adapter file (default: <recipe folder>/<name>.safetensors); "
                        "with --library, the adapters' folder (default: FOLDER)")
    parser.add_argument("--bake", type=Path, metavar="MODEL_DIR",
                        help="with --library: also bake every shield into the base's weights, a diffusers folder")
    parser.add_argument("--cache-dir", type=Path, default=Path(".dt-lora-cache"),
                        help="where generated data and latents are cached (default: .dt-lora-cache)")
    _add_overwrite_argument(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    recipe_flags = parser.add_argument_group("recipe keys (override the file)")
    for dotted, annotation in override_keys():
        if get_origin(annotation) is dict:
            continue  # template variables are tables: set them in the file
        recipe_flags.add_argument(_recipe_flag(dotted), dest=f"set:{dotted}", metavar="VALUE", default=None)
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from dt_lora import distributed
    from dt_lora.recipe import load_recipe
    from dt_lora.recipes import recipe_path
    from dt_lora.shield.train import TrainingDiverged, train_adapter

    overrides = {k[len("set:"):]: v for k, v in vars(args).items() if k.startswith("set:") and v is not None}
    if args.library is not None:
        return _run_train_library(args, overrides)
    if args.bake is not None:
        raise UserError("--bake goes with --library; bake one adapter with `dt-lora bake`")
    recipe = load_recipe(recipe_path(args.recipe) if args.recipe else None, overrides)
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
    if distributed.is_main():  # the one process that wrote it
        print(f"wrote {result.adapter} ({result.steps} steps, {result.seconds:.0f} s"
              + (f", resumed from step {result.resumed_from}" if result.resumed_from else "") + ")")
    return 0


def _run_train_library(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from dt_lora import distributed
    from dt_lora.recipe import load_recipe
    from dt_lora.shield.library import train_library

    if not args.library.is_dir():
        raise UserError(f"{args.library}: no such folder of recipes")
    paths = sorted(args.library.glob("*.toml"))
    if not paths:
        raise UserError(f"{args.library}: no recipes (*.toml) in this folder")
    recipes = [load_recipe(path, overrides) for path in paths]
    try:
        result = train_library(recipes, args.out or args.library, cache_dir=args.cache_dir, bake_to=args.bake,
                               overwrite=args.overwrite, log=(lambda line: None) if args.quiet else None)
    except KeyboardInterrupt:
        print("dt-lora train: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if distributed.is_main():
        print(f"library: {len(result.trained)} trained, {len(result.kept)} kept, {result.seconds:.0f} s; "
              f"merged {result.merged}" + (f", baked {result.baked}" if result.baked else ""))
    return 0


# ---------------------------------------------------------------- generate


def add_generate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images with shield adapters stacked on a base model",
        description="Load each --adapter into the base pipeline (stacked, each with its weight) and "
        "write PROMPT's images to OUT_DIR as PNGs. Image i uses seed SEED+i.",
    )
    parser.add_argument("prompt", metavar="PROMPT")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR")
    _add_base_arguments(parser)
    _add_adapter_argument(parser)
    parser.add_argument("-n", "--num-images", type=_images, default=4)
    parser.add_argument("--seed", type=_seed, default=0, help="image i uses seed SEED+i (default: 0)")
    parser.add_argument("--steps", type=_sampler_steps, default=25, help="sampler steps (default: 25)")
    parser.add_argument("--guidance", type=_guidance, default=5.0, help="classifier-free guidance (default: 5)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--force", action="store_true", help="use adapters trained on another base")
    _add_overwrite_argument(parser)
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from dt_lora.adapters import load_adapters, read_adapters
    from dt_lora.base import load_pipeline
    from dt_lora.base.generate import generate_images, image_names
    from dt_lora.images import write_pngs
    from dt_lora.io import claim_output_files

    names = image_names(args.seed, args.num_images)
    paths, weights = [p for p, _ in args.adapter], [w for _, w in args.adapter]
    with claim_output_files(args.out, names, args.overwrite):
        read_adapters(paths, weights)  # before the model loads
        pipeline = load_pipeline(args.base, allow_pickle=args.allow_pickle)
        if args.adapter:
            load_adapters(pipeline, paths, weights, force=args.force)
        images = generate_images(pipeline, [args.prompt] * args.num_images, seed=args.seed, steps=args.steps,
                                 guidance=args.guidance, negative_prompt=args.negative_prompt, progress=True)
        write_pngs(args.out, zip(names, images), "generate")
    print(f"wrote {len(names)} image(s) to {args.out}")
    return 0


# ---------------------------------------------------------------- merge


def add_merge_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge shield adapters into one file",
        description="Merge adapters into one. By default exactly (ranks concatenated: the merged file "
        "computes what the stack computes); with --rank R compactly (per layer, the summed weight delta "
        "truncated to rank R by SVD; the relative error per layer is printed).",
    )
    parser.add_argument("adapters", type=adapter_path, nargs="+", metavar="ADAPTER")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--weights", type=_weights_arg, default=None,
                        help="comma-separated weight per adapter (default: all 1)")
    parser.add_argument("--rank", type=_at_least_one, default=None, help="compact merge to this rank")
    parser.add_argument("--force", action="store_true", help="merge adapters trained on different bases")
    _add_overwrite_argument(parser)
    parser.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from dt_lora.adapters import write_adapter
    from dt_lora.adapters.merge import merge_adapters
    from dt_lora.io import claim_output

    with claim_output(args.out, args.overwrite, kind="adapter"):
        result = merge_adapters(args.adapters, args.weights, rank=args.rank, force=args.force)
        for layer, error in sorted(result.layer_errors.items(), key=lambda kv: -kv[1]):
            print(f"  {error:8.2%}  {layer}")
        if result.layer_errors:
            print(f"relative error: worst layer {result.overall_error:.2%}, "
                  f"mean {sum(result.layer_errors.values()) / len(result.layer_errors):.2%}")
        if result.capped_rank is not None:
            print(f"--rank {result.capped_rank} is not below the exact merge's rank {result.adapter.rank}: "
                  "wrote the exact merge, which computes the stack with no error")
        write_adapter(args.out, result.adapter)
    names = ", ".join(c.get("name", "?") for c in result.adapter.concepts)
    print(f"wrote {args.out}: rank {result.adapter.rank}, shields {names}")
    return 0


# ---------------------------------------------------------------- export


def add_export_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="convert a shield adapter for other tools (kohya: A1111, ComfyUI, sd-scripts)",
        description="Write ADAPTER in another LoRA layout. kohya: lora_unet_* lora_down/lora_up/alpha "
        "keys, alpha kept exactly (so the scale alpha/rank is unchanged).",
    )
    parser.add_argument("adapter", type=adapter_path, metavar="ADAPTER")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--format", choices=["kohya"], default="kohya")
    _add_overwrite_argument(parser)
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from dt_lora.adapters import read_adapter
    from dt_lora.adapters.export import write_kohya
    from dt_lora.io import claim_output

    with claim_output(args.out, args.overwrite, kind="kohya-lora"):
        adapter = read_adapter(args.adapter)
        write_kohya(args.out, adapter)
    print(f"wrote {args.out} ({args.format}, rank {adapter.rank}, alpha {adapter.alpha:g})")
    return 0


# ---------------------------------------------------------------- bake

DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float32": "float32", "fp32": "float32"}


def add_bake_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bake",
        help="fuse shield adapters into full model weights (diffusers folder or single-file checkpoint)",
        description="Fuse each --adapter into the base UNet's weights (exactly: W += Σ w·(α/r)·BA) and write "
        "the whole model. diffusers: a pipeline folder that diffusers and ControlNet load; single-file: one "
        ".safetensors in the original SD layout (model.diffusion_model.*, first_stage_model.*, "
        "cond_stage_model.*) for AUTOMATIC1111 and ComfyUI.",
    )
    _add_base_arguments(parser)
    _add_adapter_argument(parser, required=True, help="a shield adapter; repeat to bake several")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder or .safetensors file")
    parser.add_argument("--format", choices=["diffusers", "single-file"], default="diffusers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="weights dtype (default: float16)")
    parser.add_argument("--force", action="store_true", help="bake adapters trained on another base")
    _add_overwrite_argument(parser)
    parser.set_defaults(run=run_bake)


def run_bake(args: argparse.Namespace) -> int:
    import torch

    from dt_lora.adapters.bake import bake

    result = bake(args.base, [p for p, _ in args.adapter], args.out, format=args.format,
                  weights=[w for _, w in args.adapter], dtype=getattr(torch, DTYPES[args.dtype]),
                  force=args.force, overwrite=args.overwrite, allow_pickle=args.allow_pickle)
    names = ", ".join(c.get("name", "?") for c in result.concepts)
    print(f"wrote {result.out} ({args.format}, {args.dtype}): shields {names}; UNet fingerprint {result.unet_fingerprint}")
    return 0


# ---------------------------------------------------------------- eval


def _device() -> str:
    """Where eval and attack run: this process's accelerator (its own GPU under `accelerate launch`), or the CPU."""
    from dt_lora import distributed

    return str(distributed.state().device)


def _unit_weight_adapters(args: argparse.Namespace) -> list[Path]:
    if any(w != 1.0 for _, w in args.adapter):
        raise ValueError(f"{args.command} measures shields at weight 1; bake or merge weighted shields first")
    return [p for p, _ in args.adapter]


def add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    from dt_lora.toy import EVAL_SEED

    parser = subparsers.add_parser(
        "eval",
        help="measure a shield: is the concept gone and the rest intact? (numbers, pictures, report)",
        description="Draw each --recipe's target prompts, paraphrases and anchors with the base model and "
        "with the shield (--adapter, stacked, or --shielded, a baked model), same seeds and sampler; score "
        "them (the toy evaluator, or CLIP zero-shot with --clip); write report.json, report.md, report.html "
        "and one before/after PNG per prompt to OUT_DIR.",
    )
    _add_measurement_arguments(parser)
    parser.add_argument("--negative-prompt", metavar="TEXT",
                        help="also draw with the base model and TEXT as negative prompt (the baseline DT improves on)")
    parser.add_argument("--clip", type=Path, metavar="DIR", help="score with CLIP zero-shot from this local CLIP folder")
    parser.add_argument("--images-per-prompt", type=_images, default=2)
    parser.add_argument("--seed", type=_seed, default=EVAL_SEED, help=f"first seed (default: {EVAL_SEED})")
    parser.add_argument("--steps", type=_sampler_steps, default=None, help="sampler steps (default: the first recipe's)")
    parser.add_argument("--guidance", type=_guidance, default=None, help="guidance (default: the first recipe's)")
    quality = parser.add_argument_group("general image quality on a captions file (real models)")
    quality.add_argument("--captions", type=Path, metavar="FILE",
                         help="one caption per line, or COCO captions_*.json: each condition draws one image per caption")
    quality.add_argument("--metrics", default="fid,is,clip", help="comma-separated subset of fid,is,clip (default: all)")
    quality.add_argument("--reference-images", type=Path, metavar="DIR", help="real images for FID")
    quality.add_argument("--inception-weights", type=Path, metavar="FILE",
                         help="FID Inception weights as .safetensors (see `python -m pydoc dt_lora.evaluate.metrics`)")
    parser.add_argument("--attack", action="store_true",
                        help="also attack the shield (and the --negative-prompt baseline) with `dt-lora attack`'s "
                        "default budget; the report gets an attack section")
    parser.add_argument("--force", action="store_true", help="use adapters trained on another base")
    _add_overwrite_argument(parser)
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from dt_lora import distributed
    from dt_lora.base import load_pipeline
    from dt_lora.evaluate import QualityRequest, choose_scorer, evaluate_shields
    from dt_lora.evaluate.metrics import read_captions
    from dt_lora.io import claim_report_folder, report_folder
    from dt_lora.recipe import load_recipe
    from dt_lora.recipes import recipe_path

    with claim_report_folder(args.out, args.overwrite):
        recipes = [load_recipe(recipe_path(path)) for path in args.recipe]
        quality = None
        if args.captions:
            quality = QualityRequest(read_captions(args.captions), tuple(m for m in args.metrics.split(",") if m),
                                     args.reference_images, args.inception_weights, args.clip)
            quality.check()
        scorer = choose_scorer(recipes, args.clip)
        adapters = _unit_weight_adapters(args)
        device = _device()
        base = load_pipeline(args.base, device=device, allow_pickle=args.allow_pickle)
        shielded = load_pipeline(args.shielded, device=device, allow_pickle=args.allow_pickle) if args.shielded else None
        attack = None
        if args.attack:
            from dt_lora.search import AttackSettings, check_inputs

            attack = AttackSettings()
            check_inputs(base, recipes, adapters, attack)  # before anything is drawn
        with report_folder(args.out, command="eval", overwrite=args.overwrite) as folder:
            report = evaluate_shields(
                base, recipes, folder, adapters=adapters, shielded_pipeline=shielded, scorer=scorer,
                negative_prompt=args.negative_prompt, images_per_prompt=args.images_per_prompt, steps=args.steps,
                guidance=args.guidance, seed=args.seed, quality=quality, force=args.force, attack=attack)
    if not distributed.is_main():
        return 0
    print(report.table())
    if report.attack is not None:
        print(report.attack.table())
    print(f"wrote {args.out / 'report.html'} (and report.md, report.json, grids/)")
    return 0


# ---------------------------------------------------------------- attack


def add_attack_command(subparsers: argparse._SubParsersAction) -> None:
    from dt_lora.search import AttackSettings

    defaults = AttackSettings()
    parser = subparsers.add_parser(
        "attack",
        help="red-team a shield: search for prompts that bring the concept back, report the success rate",
        description="For each --recipe, attack some of its target prompts on the shielded model (--adapter, "
        "stacked, or --shielded, a baked model) and on the base model with the concept as negative prompt: "
        "a discrete prompt attack (free tokens before the prompt, gradient-guided coordinate search over the "
        "vocabulary, UnlearnDiffAtk-style) and a soft-prompt attack (continuous token embeddings, the upper "
        "bound). The objective is the victim's denoising error on the base model's images of the concept, relative "
        "to its error on images of the concept's neighbours (the recipe's anchors); "
        "success is judged by eval's scorer on fresh seeds. Writes report.json, report.md, report.html and "
        "before/after strips to OUT_DIR. Deterministic for a given --seed.",
    )
    _add_measurement_arguments(parser)
    parser.add_argument("--negative-prompt", metavar="TEXT",
                        help="the negative-prompt baseline's text (default: the words all of a recipe's target "
                        "prompts share, e.g. 'circle')")
    parser.add_argument("--no-negative-prompt", action="store_true", help="do not attack the negative-prompt baseline")
    parser.add_argument("--clip", type=Path, metavar="DIR", help="score with CLIP zero-shot from this local CLIP folder")
    budget = parser.add_argument_group("attack budget")
    budget.add_argument("--methods", default=",".join(defaults.methods),
                        help="comma-separated, of discrete, soft and inversion (textual inversion: one learnt token "
                        f"in place of the concept's words; default: {','.join(defaults.methods)})")
    budget.add_argument("--prompts", type=_images, default=defaults.prompts, help="target prompts attacked per concept")
    budget.add_argument("--objective", choices=("contrast", "denoise"), default=defaults.objective,
                        help="contrast (default): the concept's denoising error relative to its neighbours' (the "
                        "recipe's anchors); denoise: the concept's error alone (UnlearnDiffAtk)")
    budget.add_argument("--placement", choices=("before", "after"), default=defaults.placement,
                        help="where the free tokens go: before the target prompt (default) or after it")
    budget.add_argument("--free-tokens", type=_count(1000), default=defaults.free_tokens)
    budget.add_argument("--attack-steps", type=_search_steps, default=defaults.steps, help="discrete search iterations")
    budget.add_argument("--candidates", type=_images, default=defaults.candidates, help="swaps evaluated per iteration")
    budget.add_argument("--soft-steps", type=_search_steps, default=defaults.soft_steps, help="soft-prompt optimiser steps")
    budget.add_argument("--seeds", type=_images, default=defaults.seeds, help="fresh images per found prompt")
    budget.add_argument("--inversion-steps", type=_budgets, default=defaults.inversion_steps, metavar="N,N,...",
                        help="inversion: the training budgets measured, ascending (default: "
                        f"{','.join(map(str, defaults.inversion_steps))})")
    budget.add_argument("--inversion-vectors", type=_count(8), default=defaults.inversion_vectors,
                        help="inversion: token embeddings learnt in place of the concept's words")
    budget.add_argument("--allow-concept-words", action="store_true",
                        help="let the free tokens be the concept's own words (excluded by default)")
    parser.add_argument("--seed", type=_seed, default=defaults.seed, help="the attack's random seed")
    parser.add_argument("--steps", type=_sampler_steps, default=None, help="sampler steps (default: the first recipe's)")
    parser.add_argument("--guidance", type=_guidance, default=None, help="guidance (default: the first recipe's)")
    _add_overwrite_argument(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_attack)


def run_attack(args: argparse.Namespace) -> int:
    from dt_lora import distributed
    from dt_lora.base import load_pipeline
    from dt_lora.evaluate import choose_scorer
    from dt_lora.evaluate.attack import attack_shields
    from dt_lora.io import claim_report_folder, report_folder
    from dt_lora.recipe import load_recipe
    from dt_lora.recipes import recipe_path
    from dt_lora.search import AttackSettings, check_inputs, check_recipes, default_negative_prompt

    with claim_report_folder(args.out, args.overwrite):
        settings = AttackSettings(prompts=args.prompts, free_tokens=args.free_tokens, steps=args.attack_steps,
                                  candidates=args.candidates, soft_steps=args.soft_steps, seeds=args.seeds,
                                  allow_concept_words=args.allow_concept_words, seed=args.seed,
                                  objective=args.objective, placement=args.placement,
                                  inversion_steps=args.inversion_steps, inversion_vectors=args.inversion_vectors,
                                  methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
        settings.check()
        recipes = [load_recipe(recipe_path(path)) for path in args.recipe]
        adapters = _unit_weight_adapters(args)
        check_recipes(recipes)
        scorer = choose_scorer(recipes, args.clip)
        device = _device()
        base = load_pipeline(args.base, device=device, allow_pickle=args.allow_pickle)
        check_inputs(base, recipes, adapters, settings)  # a foreign adapter fails before any image is drawn
        shielded = load_pipeline(args.shielded, device=device, allow_pickle=args.allow_pickle) if args.shielded else None
        negative = {} if args.no_negative_prompt else {
            r.name: args.negative_prompt or default_negative_prompt(r) for r in recipes}
        with report_folder(args.out, command="attack", overwrite=args.overwrite) as out:
            result = attack_shields(base, recipes, out, adapters=adapters, shielded_pipeline=shielded, scorer=scorer,
                                    negative_prompts=negative, settings=settings, steps=args.steps,
                                    guidance=args.guidance, progress=not args.quiet)
    if not distributed.is_main():
        return 0
    print(result.table())
    if result.inversion_table():
        print("\ntextual inversion, by training steps:\n" + result.inversion_table())
    print(f"wrote {args.out / 'report.html'} (and report.md, report.json, attack/)")
    return 0


# ---------------------------------------------------------------- demo


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole job on the toy world: shield two concepts, merge, bake, evaluate, report",
        description="Shield the toy world's circle, then red; merge both; bake them into a full model; "
        "evaluate it against the base model and a negative-prompt baseline; write the report. A second "
        "run reuses the trained shields.",
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("dt-lora-demo"), help="default: dt-lora-demo")
    parser.add_argument("--recipes", type=Path, default=None,
                        help="folder with toy-circle.toml and toy-red.toml (default: the shipped recipes)")
    parser.add_argument("--base", default="toy", choices=["toy", "toy-sdxl"],
                        help="the toy SD (default) or the toy SDXL")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from dt_lora.demo import run_demo as demo

    result = demo(args.out, recipes=args.recipes, progress=not args.quiet, base=args.base)
    print(f"report: {result.report} ({result.seconds:.0f} s"
          + (f"; trained {', '.join(result.trained)}" if result.trained else "; shields reused") + ")")
    return 0


# ---------------------------------------------------------------- recipes


def add_recipes_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recipes",
        help="list the concept recipes that ship with dt-lora",
        description="Print each shipped recipe's name, base model and target (how many prompts, the first "
        "one), and whether its trained shield ships too (`--adapter NAME` takes it). `dt-lora train NAME` "
        "trains one; `--path` prints where its files are, to copy and edit them.",
    )
    parser.add_argument("--path", action="store_true", help="also print each recipe's file")
    parser.add_argument("--canvas-library", type=Path, default=None, metavar="FOLDER",
                        help="instead, write the canvas world's recipes into FOLDER: one per character and per "
                        "artist's style (`--concepts` picks some), each trainable with `dt-lora train FILE`")
    parser.add_argument("--concepts", default=None, metavar="A,B,...",
                        help="with --canvas-library: only these characters (Nimian) and styles (striped)")
    _add_overwrite_argument(parser)
    parser.set_defaults(run=run_recipes)


def run_recipes(args: argparse.Namespace) -> int:
    from dt_lora.recipes import describe_recipes

    if args.concepts is not None and args.canvas_library is None:
        raise ValueError("--concepts picks concepts for --canvas-library; give the folder too")
    if args.canvas_library is not None:
        from dt_lora.canvas.recipes import write_library

        concepts = [c.strip() for c in args.concepts.split(",")] if args.concepts else None
        # an unknown or repeated concept: ValueError; a file in the way: OutputInTheWay
        paths = write_library(args.canvas_library, concepts, overwrite=args.overwrite)
        print(f"wrote {len(paths)} recipes to {args.canvas_library}")
        return 0
    print("\n".join(describe_recipes(with_paths=args.path)))
    return 0


# ---------------------------------------------------------------- entry point

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_scramble_command, add_train_command, add_generate_command, add_merge_command, add_export_command,
    add_bake_command, add_eval_command, add_attack_command, add_demo_command, add_recipes_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dt-lora",
        description="Shield concepts in Stable Diffusion by Degeneration-Tuning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", default=False, help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    for command in subparsers.choices.values():  # `dt-lora generate ... -v` as well as `dt-lora -v generate ...`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


VERBOSE_HELP = "also show the libraries' own messages (diffusers' and transformers' loading bars and notes)"


def quiet_libraries() -> None:
    """Silence what diffusers, transformers and the kernels hub print that a dt-lora user cannot act on:
    loading bars for every component, info lines, offline-mode notes. Their errors still reach the user,
    and dt-lora's own progress and warnings are not affected."""
    import os

    # read when the libraries are first imported, which is after this in every command
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("kernels", "bitsandbytes", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(transformers|diffusers|torchvision|huggingface_hub)\b")
    from diffusers.utils import logging as diffusers_logging  # its loading bars have no environment switch

    diffusers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Expected failures print one line to stderr, no traceback,
    and return 2 (user error: bad input, missing files, an output in the way), 1 (runtime failure)
    or 130 (interrupted). Anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"dt-lora {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        print(f"dt-lora {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
