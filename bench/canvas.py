"""Erasure at scale on the canvas world: a library of character and style shields, MACE's and UnlearnCanvas' numbers.

    python -m bench canvas --out DIR [--erase 10,50,100] [--styles 8] [--set train.steps=200 ...]

1. Writes the canvas recipes of the characters to erase (in `erasure.erasure_order`: every group's first
   member, then every group's second, ...) and of `--styles` artists' styles into DIR/recipes, and trains
   them as one library into DIR/shields (`dt-lora train --library`; a re-run keeps what is trained). The
   library's time and the process's peak memory are reported: the shared base and data counted once.
2. Draws every character by name and every object in every style with the held-out phrasings and seeds
   (`dt_lora.evaluate.erasure`), with the base and with each erased set's exact merge loaded.
3. Prints the table and writes DIR/canvas-bench.json.

Characters: Acc_e (lower is better), Acc_p with the erased characters' near neighbours apart, H_c, and
what descriptions keep (object, colour, style, mark) as a share of the base's. Styles: UA, IRA and CRA for
each style shield alone, and for all of them merged.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def _counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part]
    if any(not 1 <= n <= 100 for n in counts):
        raise argparse.ArgumentTypeError(f"erased counts run from 1 to 100, got {text!r}")
    return sorted(set(counts))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="the benchmark's folder: recipes, shields, results")
    parser.add_argument("--erase", type=_counts, default=[10, 50, 100], help="characters erased together (default: 10,50,100)")
    parser.add_argument("--styles", type=int, default=8, help="style shields to train and measure (default: 8, all)")
    parser.add_argument("--per-character", type=int, default=4, help="images per character (default: 4)")
    parser.add_argument("--per-pair", type=int, default=2, help="images per (object, style) (default: 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe key for every shield, e.g. train.steps=200 (repeatable)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the data cache (default: OUT/cache)")


def _overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        overrides[key] = value
    return overrides


def _measured_with(pipeline, adapters: list[Path], folder: Path, measure):
    """`measure()` with the exact merge of `adapters` (what the stack computes) loaded into `pipeline`."""
    from dt_lora.adapters import load_adapters, unload_adapters, write_adapter
    from dt_lora.adapters.merge import merge_adapters

    path = folder / f"merged-{len(adapters)}.safetensors"
    write_adapter(path, merge_adapters(adapters).adapter)
    load_adapters(pipeline, [path])
    try:
        return measure()
    finally:
        unload_adapters(pipeline)


def run(args: argparse.Namespace) -> int:
    from dt_lora import canvas
    from dt_lora.canvas import world
    from dt_lora.canvas.recipes import recipe_name, write_library
    from dt_lora.evaluate import erasure
    from dt_lora.recipe import load_recipe
    from dt_lora.shield.library import train_library

    out: Path = args.out
    characters = erasure.erasure_order()[: max(args.erase, default=0)]
    styles = list(world.STYLES[: args.styles])
    recipes_dir, shields_dir = out / "recipes", out / "shields"
    missing = [c for c in characters + styles if not (recipes_dir / f"{recipe_name(c)}.toml").is_file()]
    if missing:  # a larger run adds its recipes to a smaller one's
        write_library(recipes_dir, missing)
    overrides = _overrides(args.set)
    recipes = [load_recipe(recipes_dir / f"{recipe_name(c)}.toml", overrides) for c in characters + styles]
    started = time.perf_counter()
    library = train_library(recipes, shields_dir, cache_dir=args.cache_dir or out / "cache")
    library_seconds = time.perf_counter() - started
    adapter = {concept: shields_dir / f"{recipe_name(concept)}.safetensors" for concept in characters + styles}

    pipeline, evaluator = canvas.load(), canvas.load_evaluator()
    sizes = {"per_character": args.per_character, "per_pair": args.per_pair}
    base_characters = erasure.measure_characters(pipeline, evaluator, **sizes)
    base_styles = erasure.measure_styles(pipeline, evaluator, per_pair=args.per_pair)
    report = {"library": {"shields": len(recipes), "trained": len(library.trained), "seconds": library_seconds,
                          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},
              "characters": [], "styles": {}, "settings": {**sizes, "overrides": overrides}}
    merges = out / "merges"
    merges.mkdir(exist_ok=True)
    for count in args.erase:
        erased = characters[:count]
        shielded = _measured_with(pipeline, [adapter[c] for c in erased], merges,
                                  lambda: erasure.measure_characters(pipeline, evaluator, **sizes))
        report["characters"].append(erasure.character_erasure(shielded, base_characters, erased))
    style_sets = {style: [style] for style in styles} | ({"all": styles} if len(styles) > 1 else {})
    for label, erased in style_sets.items():
        shielded = _measured_with(pipeline, [adapter[s] for s in erased], merges,
                                  lambda: erasure.measure_styles(pipeline, evaluator, per_pair=args.per_pair))
        report["styles"][label] = erasure.style_erasure(shielded, base_styles, erased)

    (out / "canvas-bench.json").write_text(json.dumps(report, indent=2))
    print(table(report))
    return 0


def _share(entry: dict) -> str:
    return f"{entry['rate']:.3f} [{entry['low']:.2f}–{entry['high']:.2f}]"


def table(report: dict) -> str:
    """The report as the README's Markdown tables."""
    lib = report["library"]
    lines = [f"Library: {lib['shields']} shields, {lib['seconds']:.0f} s ({lib['trained']} trained in this run), "
             f"peak {lib['peak_rss_gib']:.1f} GiB.", "",
             "| erased | Acc_e ↓ (base) | Acc_p | near neighbours | others | H_c | object / colour / style / mark × base |",
             "|---|---|---|---|---|---|---|"]
    for row in report["characters"]:
        kept = " / ".join(f"{row['descriptions'][a] / max(row['base_descriptions'][a], 1e-9):.2f}"
                          for a in ("object", "colour", "style", "mark"))
        lines.append(f"| {row['erased']} | {_share(row['acc_e'])} ({row['base_acc_e']['rate']:.2f}) | {_share(row['acc_p'])} "
                     f"| {_share(row['acc_p_neighbours']) if row['acc_p_neighbours']['images'] else '—'} "
                     f"| {_share(row['acc_p_others']) if row['acc_p_others']['images'] else '—'} "
                     f"| {row.get('h_c', float('nan')):.3f} | {kept} |")
    if report["styles"]:
        lines += ["", "| style erased | UA | IRA (base) | CRA (base) |", "|---|---|---|---|"]
        for style, entry in report["styles"].items():
            per = list(entry["per_style"].values())
            ua = sum(p["shielded"]["ua"]["rate"] for p in per) / len(per)
            ira, cra = per[0]["shielded"]["ira"], per[0]["shielded"]["cra"]
            lines.append(f"| {style} | {ua:.3f} | {_share(ira) if ira['images'] else '—'} "
                         f"({per[0]['base']['ira']['rate']:.2f}) | {_share(cra)} ({per[0]['base']['cra']['rate']:.2f}) |")
    return "\n".join(lines)
