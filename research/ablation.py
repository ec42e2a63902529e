"""Measure the Degeneration-Tuning choices that matter on the toy world.

    python -m research.ablation --target circle --out research/ablation-circle.json

Each variant trains the target's shipped recipe (`dt-lora recipes`) with one setting changed and scores the shield with
the toy evaluator (seeds 1,000,000+, never used in training). Data caches are shared between
variants that generate the same data, so only grid and scrambling-space variants regenerate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dt_lora import toy
from dt_lora.io import atomic_write
from dt_lora.recipe import load_recipe
from dt_lora.recipes import recipe_path as shipped_recipe
from dt_lora.shield.train import train_adapter
from dt_lora.toy.quality import shield_report

# The earlier default: a free rank-8 LoRA (lora_A trained too) on the attention projections named.
FREE = {"lora.text_local": "false", "lora.rank": "8", "lora.alpha": "8"}

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "rank 1": {"lora.rank": "1", "lora.alpha": "1"},
    "rank 4": {"lora.rank": "4", "lora.alpha": "4"},
    "300 steps": {"train.steps": "300"},
    "grid 2": {"scramble.grid": "2"},
    "grid 8": {"scramble.grid": "8"},
    "latent scrambling": {"scramble.space": "latent"},
    "flips": {"scramble.flips": "true"},
    "no preservation": {"train.preservation": "none"},
    "preservation by denoising": {"train.preservation": "denoise"},
    "unconditional distillation (share 0.25)": {"train.unconditional_share": "0.25"},
    "lr 3e-4": {"train.learning_rate": "3e-4"},
    "150 steps": {"train.steps": "150"},
    "600 steps": {"train.steps": "600"},
    "free LoRA: every attention projection (earlier default)": {**FREE, "lora.targets": "to_q,to_k,to_v,to_out.0"},
    "free LoRA: self-attention only (attn1)": {**FREE, "lora.targets": "attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0"},
    "free LoRA: cross-attention only (attn2)": {**FREE, "lora.targets": "attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0"},
    "free LoRA: cross-attention to_k/to_v": {**FREE, "lora.targets": "attn2.to_k,attn2.to_v"},
    "free LoRA: distillation weight 0.3": {**FREE, "lora.targets": "to_q,to_k,to_v,to_out.0",
                                           "train.preservation_weight": "0.3"},
    "free LoRA: rank 4": {**FREE, "lora.targets": "to_q,to_k,to_v,to_out.0", "lora.rank": "4", "lora.alpha": "4"},
}


def run(target: str, variants: list[str], recipe_path: Path | None = None, per_combination: int = 4) -> dict:
    pipeline = toy.load()
    evaluator = toy.load_evaluator()
    recipe_path = recipe_path or shipped_recipe(f"toy-{target}")
    results = {"base": shield_report(pipeline, evaluator, target, per_combination=per_combination).as_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            recipe = load_recipe(recipe_path, VARIANTS[name])
            started = time.perf_counter()
            trained = train_adapter(recipe, Path(tmp) / "shield.safetensors", cache_dir=Path(tmp) / "cache",
                                    pipeline=pipeline, progress=False, overwrite=True)
            report = shield_report(pipeline, evaluator, target, adapters=[trained.adapter],
                                   per_combination=per_combination)
            results[name] = {**report.as_dict(), "seconds": round(time.perf_counter() - started, 1),
                             "overrides": VARIANTS[name]}
            print(_row(name, results[name], results["base"]), flush=True)
    return results


def _row(name: str, report: dict, base: dict) -> str:
    target = report["target"]
    others = {k: v / max(base["shapes"][k], 1e-9) for k, v in report["shapes"].items() if k != target}
    colours = {k: v / max(base["colours"][k], 1e-9) for k, v in report["colours"].items() if k != target}
    return (f"| {name} | {report['target_rate']:.2f} | {report['paraphrase_rate']:.2f} | "
            f"{min(others.values()):.2f} | {min(colours.values()):.2f} | {report.get('seconds', 0):.0f} |")


def table(results: dict) -> str:
    lines = ["| variant | target rate | paraphrase rate | worst other shape (× base) | worst colour (× base) | s |",
             "|---|---|---|---|---|---|"]
    base = results["base"]
    lines.append(f"| base model (no shield) | {base['target_rate']:.2f} | {base['paraphrase_rate']:.2f} | 1.00 | 1.00 | |")
    lines += [_row(name, report, base) for name, report in results.items() if name != "base"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="circle", help="toy concept (a shape or a colour)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    parser.add_argument("--recipe", type=Path, help="recipe to vary (default: the shipped toy-<target>)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    results = run(args.target, variants, args.recipe)
    print(table(results))
    if args.out:
        with atomic_write(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
