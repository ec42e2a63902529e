"""The whole job on the toy world, in one call: `dt-lora demo`.

shield "circle" → shield "red" → merge both exactly → bake the merged shields into a full model →
evaluate the baked model against the base (and the base with a negative prompt) → report.

Everything lands in one folder; a second run reuses the trained shields (and their data caches) and
only bakes and evaluates again. `base="toy-sdxl"` runs it on the toy SDXL, with the same recipes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dt_lora.adapters import AdapterError, read_adapter, write_adapter
from dt_lora.recipes import RECIPES_DIR

CONCEPTS = ("circle", "red")


@dataclass
class DemoResult:
    report: Path
    shields: list[Path]
    baked: Path
    trained: list[str]  # concepts trained in this run (the others were reused)
    seconds: float


def find_recipes(folder: str | Path | None = None) -> Path:
    """The folder holding `toy-circle.toml` …: `folder`, else the recipes shipped with dt-lora."""
    candidate = Path(folder) if folder else RECIPES_DIR
    missing = [f"toy-{c}.toml" for c in CONCEPTS if not (candidate / f"toy-{c}.toml").is_file()]
    if missing:
        raise FileNotFoundError(f"the demo's recipes {', '.join(missing)} are not in {candidate}"
                                + ("" if folder else "; reinstall dt-lora or pass --recipes DIR"))
    return candidate


def _reusable(path: Path, name: str, fingerprint: str) -> bool:
    """A shield from an earlier run counts only if it is intact and was trained on this very base."""
    try:
        concepts = read_adapter(path).concepts
    except AdapterError:
        return False
    return [c.get("name") for c in concepts] == [name] and concepts[0].get("base_fingerprint") == fingerprint


def run_demo(out: str | Path = "dt-lora-demo", *, recipes: str | Path | None = None, progress: bool = True,
             log=print, base: str = "toy") -> DemoResult:
    from dt_lora.adapters.bake import bake
    from dt_lora.adapters.merge import merge_adapters
    from dt_lora.base import load_pipeline, unet_fingerprint
    from dt_lora.evaluate import ToyScorer, evaluate_shields
    from dt_lora.recipe import load_recipe
    from dt_lora.shield.train import train_adapter

    started = time.perf_counter()
    out = Path(out)
    folder = find_recipes(recipes)
    pipeline = load_pipeline(base)
    fingerprint = unet_fingerprint(pipeline.unet)
    loaded = [load_recipe(folder / f"toy-{c}.toml") for c in CONCEPTS]

    shields, trained = [], []
    for step, recipe in enumerate(loaded, 1):
        path = out / "shields" / f"{recipe.name}.safetensors"
        if _reusable(path, recipe.name, fingerprint):
            log(f"[{step}/5] shield {recipe.name}: reusing {path}")
        else:
            log(f"[{step}/5] shield {recipe.name}: generate, scramble, train")
            result = train_adapter(recipe, path, cache_dir=out / "cache", pipeline=pipeline, progress=progress,
                                   overwrite=True)
            log(f"      wrote {path} ({result.steps} steps, {result.seconds:.0f} s)")
            trained.append(recipe.name)
        shields.append(path)

    merged = out / "shields" / "toy-circle+red.safetensors"
    log(f"[3/5] merge both shields into {merged} (exact)")
    write_adapter(merged, merge_adapters(shields).adapter)

    baked = out / "toy-shielded"
    log(f"[4/5] bake the merged shields into a full model: {baked}")
    bake(base, [merged], baked, overwrite=True)

    log("[5/5] evaluate the baked model against the base and a negative-prompt baseline")
    report = evaluate_shields(pipeline, loaded, out / "report", shielded_pipeline=load_pipeline(baked),
                              scorer=ToyScorer(), negative_prompt=", ".join(CONCEPTS), progress=progress)
    log(report.table())
    return DemoResult(out / "report" / "report.html", shields, baked, trained, time.perf_counter() - started)
