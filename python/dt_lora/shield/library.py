"""Train a library of shields, one adapter per concept, on one loaded base; then merge them and bake.

    result = train_library([load_recipe(p) for p in paths], "shields/", bake_to="shielded-model")

Each concept is trained by `train.train_adapter` into `<out>/<name>.safetensors`, one after the other on
the same pipeline, so the base loads once. The library ends with `<out>/merged.safetensors`, the exact
merge (it computes what the stack computes), and, with `bake_to`, a baked model folder. Under
`accelerate launch` the processes share the concepts out: each trains its concepts alone, on its own
device (`distributed.alone`), and a concept's adapter is the one a single process would train. (One
concept trains data-parallel on all the processes with `dt-lora train RECIPE`.)

A re-run of the same library resumes: a concept whose adapter is there, trained from the same recipe on
the same base, is kept; an interrupted concept resumes at its checkpoint step (train.py); the merged
file, the library's own, is rewritten when the adapters changed, and so is the baked model. Everything
that can be refused (a concept named twice, recipes for different bases, an output in the way) is
refused before any concept trains.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from dt_lora import distributed
from dt_lora.errors import UserError
from dt_lora.recipe import Recipe

MERGED_NAME = "merged"  # <out>/merged.safetensors, so no concept may have this name


@dataclass
class LibraryResult:
    adapters: list[Path]
    merged: Path
    baked: Path | None
    trained: list[str] = field(default_factory=list)  # concepts trained (or resumed) by this run
    kept: list[str] = field(default_factory=list)  # concepts whose adapter was there already
    seconds: float = 0.0


def check_library(recipes: Sequence[Recipe]) -> None:
    """Refuse, in one line, a library that cannot be trained as one: empty, a name twice, several bases."""
    if not recipes:
        raise UserError("the library has no recipes")
    seen: dict[str, int] = {}
    for number, recipe in enumerate(recipes, start=1):
        if recipe.name == MERGED_NAME:
            raise UserError(f"recipe {number} is named {MERGED_NAME!r}, the name of the library's merged file; "
                            "rename the concept")
        if recipe.name in seen:
            raise UserError(f"concept {recipe.name!r} is in the library twice (recipes {seen[recipe.name]} and {number})")
        seen[recipe.name] = number
    bases = sorted({recipe.base for recipe in recipes})
    if len(bases) > 1:
        raise UserError(f"the library's recipes name different bases ({', '.join(bases)}); train one library per base")


def _concepts(path: Path) -> list[dict] | None:
    """The concepts recorded in adapter `path`, or None when it is missing or not a readable adapter."""
    from dt_lora.adapters import AdapterError, read_adapter

    try:
        return read_adapter(path).concepts
    except AdapterError:
        return None


def _finished(path: Path, recipe: Recipe, base_fingerprint: str) -> bool:
    """Whether `path` is this recipe's adapter, trained on this base: nothing is left to do for it."""
    concepts = _concepts(path)
    return (concepts is not None and len(concepts) == 1
            and concepts[0].get("recipe_fingerprint") == recipe.fingerprint()
            and concepts[0].get("base_fingerprint") == base_fingerprint)


def _baked_concepts(folder: Path) -> list[dict] | None:
    from dt_lora.io import OUTPUT_MARKER, is_dt_lora_folder

    return json.loads((folder / OUTPUT_MARKER).read_text()).get("concepts") if is_dt_lora_folder(folder) else None


def train_library(
    recipes: Sequence[Recipe],
    out: str | Path,
    *,
    cache_dir: str | Path = ".dt-lora-cache",
    bake_to: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> LibraryResult:
    """Train every recipe's shield into folder `out`, merge them exactly into `out/merged.safetensors`, and
    bake them into folder `bake_to` when it is given. `log` gets one line per concept (default: print, on
    the main process); `progress` shows each concept's progress bars as well.

    `overwrite` lets a concept's adapter trained from another recipe, and a baked model of other
    adapters, be replaced (only dt-lora's own files, as everywhere)."""
    from dt_lora.adapters import write_adapter
    from dt_lora.adapters.bake import bake
    from dt_lora.adapters.merge import merge_adapters
    from dt_lora.base import load_pipeline, unet_fingerprint
    from dt_lora.io import check_output, check_writable, output_lock
    from dt_lora.shield.train import optimizer_class, train_adapter

    main = distributed.is_main()
    if log is None:  # each process reports the concepts it trains; the main process everything else
        log = print
    started = time.perf_counter()
    check_library(recipes)
    for recipe in recipes:
        optimizer_class(recipe.train.optimizer)  # a missing bitsandbytes, before the base loads
    out = Path(out)
    bake_to = Path(bake_to) if bake_to is not None else None
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; a library's adapters go into a folder")
    if bake_to is not None and bake_to.resolve() == out.resolve():
        raise UserError(f"{bake_to}: the baked model needs a folder of its own, not the library's")
    adapters = [out / f"{recipe.name}.safetensors" for recipe in recipes]
    merged_path = out / f"{MERGED_NAME}.safetensors"

    with ExitStack() as held:
        pipeline = load_pipeline(recipes[0].base, device=str(distributed.state().device))
        fingerprint = unet_fingerprint(pipeline.unet)
        done = [_finished(path, recipe, fingerprint) for path, recipe in zip(adapters, recipes)]
        refusal = None
        if main:  # every refusal before the first concept trains
            try:
                # one run of a library at a time; locks are per machine, so the main process holds it
                held.enter_context(output_lock(merged_path))
                for path, finished in zip(adapters, done):
                    if not finished:
                        check_output(path, overwrite, kind="adapter")
                check_output(merged_path, True, kind="adapter")  # the library's own file: a dt-lora adapter
                if bake_to is not None and not (all(done) and _baked_concepts(bake_to) == _stacked_concepts(adapters)):
                    check_output(bake_to, overwrite, kind="model")
                out.mkdir(parents=True, exist_ok=True)
                check_writable(merged_path)
            except (UserError, OSError) as error:
                refusal = error
        # every process learns of a refusal, so that none goes on to train alone (train._claimed does the same)
        process = distributed.state()
        if any(distributed.gather([(process.process_index, refusal is not None)])):
            raise refusal or UserError(f"{out}: refused by the main process (its message says why)")

        result = LibraryResult(adapters, merged_path, bake_to)
        result.kept = [recipe.name for recipe, finished in zip(recipes, done) if finished]
        counter_width = len(str(len(recipes)))
        counters = [f"[{number:>{counter_width}}/{len(recipes)}] {recipe.name}"
                    for number, recipe in enumerate(recipes, start=1)]
        if main:
            for counter, path, finished in zip(counters, adapters, done):
                if finished:
                    log(f"{counter}: kept {path}, trained from this recipe before")
        to_train = [i for i, finished in enumerate(done) if not finished]
        result.trained = [recipes[i].name for i in to_train]
        failure, failed_concept = None, None
        with distributed.alone():  # each concept on one process: no process waits for another mid-concept
            for i in to_train[process.process_index::process.num_processes]:
                try:
                    trained = train_adapter(recipes[i], adapters[i], cache_dir=cache_dir, pipeline=pipeline,
                                            progress=progress and main, overwrite=overwrite)
                except Exception as error:  # the others must learn of it, or they would wait for this process
                    failure, failed_concept = error, recipes[i].name
                    break
                resumed = f", resumed at step {trained.resumed_from}" if trained.resumed_from else ""
                by = (f" (process {process.process_index + 1}/{process.num_processes})"
                      if process.num_processes > 1 else "")
                log(f"{counters[i]}: {trained.steps} steps in {trained.seconds:.0f} s{resumed}, "
                    f"final loss {trained.final_loss:.4f}{by}")
        del pipeline
        failures = distributed.gather([(process.process_index, failure and f"{failed_concept}: {failure}")])
        if failure is not None:
            raise failure
        for number, message in enumerate(failures, start=1):
            if message:  # every process says why the library stopped: the launcher may end the failed one first
                raise UserError(f"{message} (on process {number} of {len(failures)}; the finished adapters are kept)")

        if main:
            concepts = _stacked_concepts(adapters)
            if _concepts(merged_path) == concepts:
                log(f"merged: {merged_path} is up to date")
            else:
                merged = merge_adapters(adapters).adapter
                write_adapter(merged_path, merged)
                log(f"merged: {merged_path} (exact, rank {merged.rank}, {len(merged.concepts)} shields)")
            if bake_to is not None:
                if _baked_concepts(bake_to) == concepts:
                    log(f"baked: {bake_to} is up to date")
                else:
                    bake(recipes[0].base, [merged_path], bake_to, overwrite=True)  # checked above
                    log(f"baked: {bake_to} ({len(adapters)} shields in the base's weights)")
        distributed.wait()
    result.seconds = time.perf_counter() - started
    return result


def _stacked_concepts(adapters: list[Path]) -> list[dict]:
    """The concepts that a merge or bake of `adapters` at weight 1 records, in order (merge.merge_adapters)."""
    return [{**concept, "merge_weight": 1.0} for path in adapters for concept in (_concepts(path) or [])]


__all__ = ["MERGED_NAME", "LibraryResult", "check_library", "train_library"]
