"""How shields hold up when stacked, on the recipes' phrasings and on phrasings nobody tuned on.

    python -m research.stacking toy-circle.safetensors toy-red.safetensors toy-square.safetensors \
        toy-blue.safetensors toy-triangle.safetensors toy-green.safetensors --singles --merge-rank 6 --bake \
        --out research/stacking.json

For k = 1 … n the first k adapters are stacked (`load_lora_weights` + `set_adapters`, weight 1 each)
and every prompt of `toy.phrasings`' families is drawn (2 images a prompt, seeds from 3,000,000):
each target's rate over the prompts that name it, and every concept no stacked shield names compared
with the base model on the same prompts and seeds. Families come in groups: `standard` (the recipes'
templates and one attribute alone), `paraphrases` (the recipes' held-out paraphrases), `tuning`
(phrasings looked at while choosing defaults), `heldout` (phrasings for measuring only) and `several`
(two shapes in one prompt, where a shield can tip which one is drawn).
`--singles` also measures each shield alone; `--merge-rank R` all n merged exactly and merged to rank
R; `--bake` all n baked into the UNet's weights; `--picture FILE` draws, for the first prompt of each
family that names no shielded concept and of a few that name one, the base model and all n stacked.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dt_lora import toy
from dt_lora.adapters import read_adapter, write_adapter
from dt_lora.adapters.merge import merge_adapters
from dt_lora.io import atomic_write
from dt_lora.toy import phrasings, world

GROUPS = {
    "standard": phrasings.STANDARD_FAMILIES,
    "paraphrases": phrasings.PARAPHRASE_FAMILIES,
    "tuning": phrasings.TUNING_FAMILIES,
    "heldout": phrasings.HELDOUT_FAMILIES,
    "several": phrasings.SEVERAL_FAMILIES,
}


def toy_concept(adapter: Path) -> str:
    """The toy concept a shield targets, from its provenance (`toy-circle` → `circle`)."""
    concepts = read_adapter(adapter).concepts
    if len(concepts) != 1:
        raise ValueError(f"{adapter}: expected one shielded concept, found {len(concepts)}")
    name = concepts[0].get("name", "").removeprefix("toy-")
    if name not in world.SHAPES + world.COLOURS:
        raise ValueError(f"{adapter}: shields {name!r}, not a toy-world concept")
    return name


def _families() -> dict[str, tuple[str, ...]]:
    return {f"{group}/{name}": templates for group, families in GROUPS.items() for name, templates in families.items()}


def row(label: str, targets: list[str], shielded: phrasings.PhrasingReport, base: phrasings.PhrasingReport) -> dict:
    """Per group: each target's rate, and every other concept's rate ÷ the base's."""
    out = {"shields": label, "targets": targets}
    for group in GROUPS:
        mine, theirs = shielded.subset(group + "/", targets), base.subset(group + "/", targets)
        others = mine.others_vs(theirs)
        worst = min(others, key=others.get) if others else None
        out[group] = {"targets": {t: mine.rate(t) for t in targets}, "others_vs_base": others,
                      "worst_other": others.get(worst), "worst_concept": worst,
                      "images_per_other_concept": min((mine.count(c, excluding=tuple(targets)) for c in others),
                                                      default=0)}
    return out


def run(adapters: list[Path], *, singles: bool = False, merge_rank: int | None = None, bake: bool = False,
        images_per_prompt: int = 2, progress: bool = True, base: str = "toy") -> dict:
    from dt_lora.base import load_pipeline

    pipeline, evaluator = load_pipeline(base), toy.load_evaluator()
    targets = [toy_concept(a) for a in adapters]
    families = _families()

    def measure(label: str, chosen: list[str], stack=(), model=None) -> dict:
        started = time.perf_counter()
        report = phrasings.phrasing_report(model or pipeline, evaluator, chosen, families=families,
                                           images_per_prompt=images_per_prompt, adapters=stack)
        result = {**row(label, chosen, report, reference), "seconds": round(time.perf_counter() - started, 1)}
        if progress:
            print(summary_line(result), flush=True)
        return result

    reference = phrasings.phrasing_report(pipeline, evaluator, [], families=families,
                                          images_per_prompt=images_per_prompt)  # the base model's
    rows = [measure(" + ".join(targets[:k]), targets[:k], adapters[:k]) for k in range(1, len(adapters) + 1)]
    if singles:
        rows += [measure(f"{t} alone", [t], [a]) for t, a in zip(targets[1:], adapters[1:])]
    with tempfile.TemporaryDirectory() as folder:
        if merge_rank:
            for rank in (None, merge_rank):
                merged = write_adapter(Path(folder) / f"merged-{rank}.safetensors",
                                       merge_adapters(adapters, rank=rank).adapter)
                label = f"all {len(targets)} merged " + (f"to rank {rank}" if rank else "exactly")
                rows.append(measure(label, targets, [merged]))
        if bake:
            from dt_lora.adapters.bake import bake as bake_model

            out = bake_model(base, adapters, Path(folder) / "baked", dtype=pipeline.unet.dtype)
            baked = toy.load(model_dir=out.out)
            rows.append(measure(f"all {len(targets)} baked", targets, model=baked))
    return {"images_per_prompt": images_per_prompt, "families": {k: list(v) for k, v in families.items()},
            "rows": rows}


def picture(adapters: list[Path], path: Path, seeds: int = 3, base: str = "toy") -> None:
    """Base model | all adapters stacked, `seeds` images each, on the first prompt of every family that
    names no shielded concept and on the first few prompts that name one."""
    import numpy as np
    from PIL import Image

    from dt_lora.adapters import load_adapters, unload_adapters
    from dt_lora.base import load_pipeline
    from dt_lora.base.generate import generate_images, image_grid
    from dt_lora.evaluate.report import labelled_strips

    pipeline, targets = load_pipeline(base), [toy_concept(a) for a in adapters]
    prompts, seen = [], set()
    for prompt in phrasings.family_prompts(_families()):
        named = any(prompt.names(t) for t in targets)
        if (prompt.family, named) not in seen and (not named or sum(1 for _, n in seen if n) < 4):
            seen.add((prompt.family, named))
            prompts.append(prompt)
    texts = [p.text for p in prompts for _ in range(seeds)]
    sampler = {"seed": phrasings.PHRASING_SEED, "steps": toy.DEFAULT_STEPS, "guidance": toy.DEFAULT_GUIDANCE}
    before = generate_images(pipeline, texts, **sampler)
    load_adapters(pipeline, adapters)
    try:
        after = generate_images(pipeline, texts, **sampler)
    finally:
        unload_adapters(pipeline)
    rows = []
    for k, prompt in enumerate(prompts):
        pair = np.concatenate([before[k * seeds:(k + 1) * seeds], after[k * seeds:(k + 1) * seeds]])
        rows.append((f"{prompt.family.split('/')[0]}: {prompt.text}", Image.fromarray(image_grid(pair, 2 * seeds, 3))))
    canvas = labelled_strips(rows, ["base", f"{len(adapters)} shields stacked: " + ", ".join(targets)])
    with atomic_write(path) as f:
        canvas.save(f, format="PNG")


def summary_line(result: dict) -> str:
    parts = []
    for group in GROUPS:
        g = result[group]
        worst_target = max(v for v in g["targets"].values() if v is not None)
        parts.append(f"{group}: targets ≤ {worst_target:.2f}, others ≥ {g['worst_other']:.2f}× ({g['worst_concept']})")
    return f"{result['shields']}: " + "; ".join(parts)


def table(result: dict) -> str:
    lines = ["| shields | targets, worst (recipe templates / paraphrases / tuning / held-out / several) | "
             "others, worst × base (standard / paraphrases / tuning / held-out / several) |", "|---|---|---|"]
    for r in result["rows"]:
        targets = " / ".join(f"{max(r[g]['targets'].values()):.2f}" for g in GROUPS)
        others = " / ".join(f"{r[g]['worst_other']:.2f} ({r[g]['worst_concept']})" for g in GROUPS)
        lines.append(f"| {r['shields']} | {targets} | {others} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.stacking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", type=Path, nargs="+", help="toy shields, stacked in this order")
    parser.add_argument("--singles", action="store_true", help="also measure each shield alone")
    parser.add_argument("--merge-rank", type=int, help="also measure all adapters merged exactly and to this rank")
    parser.add_argument("--bake", action="store_true", help="also measure all adapters baked into the weights")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    parser.add_argument("--picture", type=Path, help="write a picture of base vs all stacked here (PNG)")
    parser.add_argument("--base", default="toy", choices=["toy", "toy-sdxl"], help="the toy SD (default) or the toy SDXL")
    args = parser.parse_args(argv)
    if args.picture:
        picture(args.adapters, args.picture, base=args.base)
    result = run(args.adapters, singles=args.singles, merge_rank=args.merge_rank, bake=args.bake,
                 images_per_prompt=args.images_per_prompt, base=args.base)
    print(table(result))
    if args.out:
        with atomic_write(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
