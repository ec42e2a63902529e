"""Adversarial training, AdvUnlearn-style in rounds: attack the trained shield, add the prompts that the
attack found to the target prompts, train again.

    recipe.train.adversarial_rounds = 1      # dt-lora train toy-red --train-adversarial-rounds 1

Round r trains the recipe whose target prompts are the original ones plus every prompt found so far;
the base model draws those prompts' images like any other target prompt, so a found prompt is shielded
the way its source prompt is. The attack is `dt-lora attack`'s discrete attack (attack.find_prompts) with
seed 1000 + r: never the seed `dt-lora attack` measures with (0 by default). Each round's adapter and
found prompts are kept in the work folder, so an interrupted run resumes at the round it stopped in.
Under `accelerate launch`, the attack's prompts are split between the processes and the main process
writes the records.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dt_lora import distributed
from dt_lora.io import atomic_write, remove_if_empty
from dt_lora.recipe import Recipe

ATTACK_SEED_OFFSET = 1000


def with_found_prompts(recipe: Recipe, found: list[str]) -> Recipe:
    """The recipe whose target prompts also hold `found` (as literal prompts, after its own)."""
    prompts = list(recipe.target.prompts) + [p for p in found if p not in recipe.target_prompts]
    return dataclasses.replace(recipe, target=dataclasses.replace(recipe.target, prompts=prompts))


def train_adversarial(recipe: Recipe, out: Path, work: Path, *, pipeline, train_round, progress: bool):
    """`recipe.train.adversarial_rounds` rounds of (train, attack, extend), then the final training.

    `train_round(recipe, out, work_dir)` trains one recipe (train.train_adapter's single run); the final
    round writes `out`, whose recorded recipe lists every found prompt among its target prompts.
    """
    from dt_lora.search import AttackSettings, check_inputs, find_prompts

    rounds = recipe.train.adversarial_rounds
    settings = AttackSettings(prompts=recipe.train.adversarial_prompts, methods=("discrete",))
    check_inputs(pipeline, [recipe], [], settings)  # a prompt too long to attack fails before any training
    work.mkdir(parents=True, exist_ok=True)
    current = recipe
    for r in range(rounds):
        adapter, record = work / f"round-{r}.safetensors", work / f"round-{r}.json"
        if record.is_file():  # done before an interruption: the same prompts again
            found = json.loads(record.read_text())["found"]
        else:
            if not adapter.is_file():
                train_round(current, adapter, work / f"round-{r}.work")
            if progress and distributed.is_main():
                print(f"[dt-lora] adversarial round {r + 1}/{rounds}: attacking {recipe.name}")
            # the recipe's own prompts are attacked, never found ones (a found prompt has no room left for
            # more free tokens, and attacking it twice would stack contexts nobody types)
            found = find_prompts(pipeline, recipe, [adapter],
                                 dataclasses.replace(settings, seed=ATTACK_SEED_OFFSET + r))
            if distributed.is_main():  # every process found the same prompts (attack.find_prompts gathers them)
                with atomic_write(record, "w") as f:
                    json.dump({"round": r, "found": found}, f, indent=1)
            distributed.wait()
        current = with_found_prompts(current, found)
    result = train_round(current, out, work / "final.work")
    if not distributed.is_main():
        return result
    for r in range(rounds):  # the rounds' files, now that the final adapter exists
        for name in (f"round-{r}.safetensors", f"round-{r}.json"):
            (work / name).unlink(missing_ok=True)
    remove_if_empty(work)
    return result
