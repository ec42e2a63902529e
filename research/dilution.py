"""How far an attack's found prompts dilute a text-local shield's response, against the prompts it keeps.

    dt-lora attack --recipe toy-red --adapter red.safetensors --methods discrete --prompts 25 -o red-attack
    python -m research.dilution toy-red red-attack/report.json

A text-local shield acts on a prompt in proportion to how strongly the prompt's token embeddings answer
its directions (locality.py). Each prompt's response here is the norm of that projection over every
token position, the directions scaled to unit rms on the retained prompts. Printed: the recipe's target
prompts, the same after random words of the vocabulary and after the anchors' words; the attack's found
prompts, relative to their source prompts, broken and held apart; and the retained prompts (99th
percentile, maximum, and those that answer most); then the same along the target prompts' own direction
of response, which is what lora_B can single out. A found prompt that answers less than some retained
prompts can be degenerated without touching them only by the direction of its response, not by its size
(research/, "How the attack gets through").
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from dt_lora import toy
from dt_lora.base.family import encode_prompts
from dt_lora.recipe import load_recipe
from dt_lora.recipes import recipe_path
from dt_lora.shield.locality import _direction_prompts, concept_words, shield_directions, vocabulary_words

CONTEXTS = 1000  # target prompts drawn in each kind of context
SEED = 7


def in_contexts(prompts: list[str], words: list[str], count: int, low: int, high: int, seed: int) -> list[str]:
    """`count` of `prompts`, each after `low`–`high` random `words`."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(low, high))) + " " + rng.choice(prompts)
            for _ in range(count)]


def dilution(pipeline, recipe, found: list[dict], top: int = 5) -> dict:
    """The table of the module docstring, for `recipe`'s shield and an attack's `found` entries
    (report.json's `found` list: source, found, broken)."""
    directions = shield_directions(pipeline, recipe)
    _, retained = _direction_prompts(pipeline, recipe)
    exclude = concept_words(recipe.target_prompts, recipe.anchor_prompts)
    neighbours = sorted({w for p in recipe.anchor_prompts for w in p.lower().split()} - exclude)

    def tokens(prompts: list[str]) -> torch.Tensor:
        """(N, L, rank): each token's projection on the directions."""
        return encode_prompts(pipeline, prompts).embeds @ directions.T

    def size(projections: torch.Tensor) -> torch.Tensor:
        """(N,) each prompt's response: the norm of its projections over every token position."""
        return projections.norm(dim=-1).norm(dim=-1)

    # The norm hides direction: lora_B sees the rank-dimensional response and can treat directions apart.
    # Along the target's own (the target tokens' summed response), each prompt's largest token:
    target, kept = tokens(recipe.target_prompts), tokens(retained)
    own = target.reshape(-1, target.shape[-1]).sum(0)
    own = own / own.norm()

    def along(projections: torch.Tensor) -> torch.Tensor:
        return (projections @ own).max(1).values

    median = lambda x: round(float(x.median()), 1) if len(x) else None  # noqa: E731
    kept_size, kept_along = size(kept), along(kept)
    table = {
        "target prompts": median(size(target)),
        "after 1-8 vocabulary words": median(size(tokens(in_contexts(
            recipe.target_prompts, vocabulary_words(pipeline.tokenizer, exclude), CONTEXTS, 1, 8, SEED)))),
        "after 4-8 neighbour words": median(size(tokens(in_contexts(
            recipe.target_prompts, neighbours, CONTEXTS, 4, 8, SEED)))),
        "retained p99": round(float(kept_size.quantile(0.99)), 1), "retained max": round(float(kept_size.max()), 1),
        "retained answering most": [(retained[i], round(float(kept_size[i]), 1))
                                    for i in kept_size.argsort(descending=True)[:top]],
    }
    if found:
        found_tokens = tokens([e["found"] for e in found])
        found_size, found_along = size(found_tokens), along(found_tokens)
        ratio = found_size / size(tokens([e["source"] for e in found]))
        broken = torch.tensor([bool(e["broken"]) for e in found])
        share = lambda x: round(float(x.median()), 2) if len(x) else None  # noqa: E731
        table.update({"found prompts": median(found_size), "found / source, broken": share(ratio[broken]),
                      "found / source, held": share(ratio[~broken]),
                      "found prompts above the retained max": int((found_size > kept_size.max()).sum())})
    table.update({"along the target's direction: target prompts": median(along(target)),
                  "along the target's direction: retained p99 / max":
                      (round(float(kept_along.quantile(0.99)), 1), round(float(kept_along.max()), 1))})
    if found:
        table.update({"along the target's direction: found prompts": median(found_along),
                      "along the target's direction: found above the retained max":
                          int((found_along > kept_along.max()).sum())})
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.dilution", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="the shield's recipe (.toml) or a shipped recipe's name")
    parser.add_argument("report", type=Path, nargs="?", help="a `dt-lora attack` report.json of that shield")
    parser.add_argument("--victim", default="shielded")
    args = parser.parse_args(argv)
    recipe = load_recipe(recipe_path(args.recipe))
    found = []
    if args.report:
        found = json.loads(args.report.read_text())["attack"]["concepts"][recipe.name][args.victim]["discrete attack"]["found"]
    for key, value in dilution(toy.load(), recipe, found).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
