"""How shields hold up when stacked: 1, 2, 3 and 4 toy shields on one pipeline.

    python -m dt_lora.research.stacking toy-circle.safetensors toy-red.safetensors toy-square.safetensors \
        toy-blue.safetensors --out docs/stacking.json

For k = 1 … n, the first k adapters are stacked; each target's rate is compared with its rate when
its shield is alone, and every concept no shield names is compared with the base model. The bar: each
target within 5 points of its single-shield rate, every other concept at ≥ 90% of base. With
`--compact-rank R`, all n are also merged into one rank-R file by SVD (`merge --rank R`) and measured
the same way: whether that truncation is acceptable is this table's call.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .. import toy
from ..adapters import read_adapter, write_adapter
from ..io import atomic_write
from ..merge import merge_adapters
from ..toy import world
from ..toy.quality import shield_reports


def toy_concept(adapter: Path) -> str:
    """The toy concept a shield targets, from its provenance (`toy-circle` → `circle`)."""
    concepts = read_adapter(adapter).concepts
    if len(concepts) != 1:
        raise ValueError(f"{adapter}: expected one shielded concept, found {len(concepts)}")
    name = concepts[0].get("name", "").removeprefix("toy-")
    if name not in world.SHAPES + world.COLOURS:
        raise ValueError(f"{adapter}: shields {name!r}, not a toy-world concept")
    return name


def _row(label: str, targets: list[str], stacked: dict, single: dict, base_rest) -> dict:
    any_report = next(iter(stacked.values()))
    others = {**any_report.shape_rates, **any_report.colour_rates}
    base_others = {**base_rest.shape_rates, **base_rest.colour_rates}
    return {
        "shields": label,
        "targets": {t: {"single": single[t].target_rate, "stacked": stacked[t].target_rate,
                        "paraphrase_single": single[t].paraphrase_rate,
                        "paraphrase_stacked": stacked[t].paraphrase_rate} for t in targets},
        "others_vs_base": {c: (others[c] / base_others[c] if base_others[c] else None) for c in others},
        "worst_other_vs_base": min(others[c] / base_others[c] for c in others if base_others[c]),
        "worst_target_increase": max(stacked[t].target_rate - single[t].target_rate for t in targets),
    }


def run(adapters: list[Path], per_combination: int = 4, compact_rank: int | None = None) -> dict:
    pipeline, evaluator = toy.load(), toy.load_evaluator()
    targets = [toy_concept(a) for a in adapters]
    base = shield_reports(pipeline, evaluator, targets, per_combination=per_combination)
    single = {t: shield_reports(pipeline, evaluator, [t], adapters=[a], per_combination=per_combination)[t]
              for t, a in zip(targets, adapters)}
    rows = []
    for k in range(1, len(adapters) + 1):
        stacked = shield_reports(pipeline, evaluator, targets[:k], adapters=adapters[:k],
                                 per_combination=per_combination)
        base_rest = shield_reports(pipeline, evaluator, targets[:k], per_combination=per_combination)[targets[0]]
        rows.append(_row(" + ".join(targets[:k]), targets[:k], stacked, single, base_rest))
    if compact_rank:
        with tempfile.TemporaryDirectory() as folder:
            merged = write_adapter(Path(folder) / "merged.safetensors",
                                   merge_adapters(adapters, rank=compact_rank).adapter)
            compact = shield_reports(pipeline, evaluator, targets, adapters=[merged], per_combination=per_combination)
        rows.append(_row(f"all {len(targets)} merged to rank {compact_rank}", targets, compact, single, base_rest))
    return {"base_target_rates": {t: base[t].target_rate for t in targets}, "stacks": rows,
            "per_combination": per_combination}


def table(result: dict) -> str:
    lines = ["| shields stacked | each target: alone → stacked | paraphrases: alone → stacked | other concepts, worst vs base |",
             "|---|---|---|---|"]
    for row in result["stacks"]:
        targets = ", ".join(f"{t} {r['single']:.2f}→{r['stacked']:.2f}" for t, r in row["targets"].items())
        paraphrases = ", ".join(f"{t} {r['paraphrase_single']:.2f}→{r['paraphrase_stacked']:.2f}"
                                for t, r in row["targets"].items())
        lines.append(f"| {row['shields']} | {targets} | {paraphrases} | {row['worst_other_vs_base']:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dt_lora.research.stacking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", type=Path, nargs="+", help="toy shields, stacked in this order")
    parser.add_argument("--compact-rank", type=int, help="also measure all adapters merged to this rank")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    result = run(args.adapters, compact_rank=args.compact_rank)
    print(table(result))
    if args.out:
        with atomic_write(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
