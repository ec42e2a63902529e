"""Does a concept travel through SDXL's pooled path? Mixed conditionings on the toy SDXL.

    python -m research.pooled toy-circle.safetensors --other square

An attention LoRA sees the prompt through cross-attention only; SDXL also feeds the second text
encoder's pooled embedding into the time embedding, which no attention LoRA touches. For every target
prompt of the shield's recipe, and the same prompt with the concept's word replaced by `--other`:

    normal   cross-attention states and pooled embedding of the concept's prompt
    pooled   cross-attention states of the other prompt, pooled embedding of the concept's
    alone    cross-attention states of the empty prompt, pooled embedding of the concept's
    embeds   cross-attention states of the concept's prompt, pooled embedding of the other's
    prompt_2 the concept's prompt to the second text encoder only (OpenCLIP-G: its half of the states and the
             pooled embedding), the empty prompt to the first: what `pipeline(prompt="", prompt_2=…)`
             and ComfyUI's CLIPTextEncodeSDXL (text_l empty, text_g the concept) feed the UNet
    prompt_1 the reverse: the concept's prompt to the first encoder (CLIP-L) only
    empty    the empty prompt's states and pooled embedding: how often the model draws the concept
             unasked; a rate at this level in another column is no leak

each drawn on the base model and with the shield (4 seeds a prompt from 1,000,000, DDIM 25 steps,
guidance 5), and scored by the toy evaluator: the share of images showing the concept. If the base
draws the concept from the pooled embedding alone and the shield does not stop it, the concept leaks
around an attention shield.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dt_lora import toy
from dt_lora.adapters import load_adapters, unload_adapters
from dt_lora.base import TOY_SDXL, load_pipeline
from dt_lora.base.family import Conditioning, encode_for_one_encoder, encode_prompts
from dt_lora.recipe import load_recipe
from dt_lora.recipes import recipe_path
from dt_lora.search import draw_prompt_inputs
from dt_lora.toy.quality import shows_concept
from research.stacking import toy_concept

CONDITIONS = ("normal", "pooled", "alone", "embeds", "prompt_2", "prompt_1", "empty")


def _draw(pipeline, embeds: torch.Tensor, pooled: torch.Tensor, seeds: int) -> np.ndarray:
    """`seeds` images of every row, row i's from EVAL_SEED + 100·i on."""
    return np.concatenate([
        draw_prompt_inputs(pipeline, Conditioning(embeds[i:i + 1], pooled[i:i + 1]), None, seed=toy.EVAL_SEED + 100 * i,
                           count=seeds, steps=toy.DEFAULT_STEPS, guidance=toy.DEFAULT_GUIDANCE)
        for i in range(len(embeds))])


def measure(adapter: Path, other: str, seeds: int = 4) -> dict:
    pipeline, evaluator = load_pipeline(TOY_SDXL), toy.load_evaluator()
    concept = toy_concept(adapter)
    prompts = [p for p in load_recipe(recipe_path(f"toy-{concept}")).target_prompts if concept in p.split()]
    swapped = [" ".join(other if word == concept else word for word in p.split()) for p in prompts]
    own, theirs = encode_prompts(pipeline, prompts), encode_prompts(pipeline, swapped)
    nothing = encode_prompts(pipeline, [""])
    empty, empty_pooled = (x.expand(len(prompts), *x.shape[1:]) for x in (nothing.embeds, nothing.pooled))
    first, second = (encode_for_one_encoder(pipeline, prompts, encoder) for encoder in (0, 1))
    inputs = {"normal": (own.embeds, own.pooled), "pooled": (theirs.embeds, own.pooled),
              "alone": (empty, own.pooled), "embeds": (own.embeds, theirs.pooled),
              "prompt_2": (second.embeds, second.pooled), "prompt_1": (first.embeds, first.pooled),
              "empty": (empty, empty_pooled)}
    result = {"concept": concept, "other": other, "prompts": len(prompts), "seeds": seeds}
    for victim in ("base", "shielded"):
        if victim == "shielded":
            load_adapters(pipeline, [adapter])
        try:
            result[victim] = {name: float(np.mean(shows_concept(evaluator, _draw(pipeline, *inputs[name], seeds),
                                                                concept)))
                              for name in CONDITIONS}
        finally:
            if victim == "shielded":
                unload_adapters(pipeline)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.pooled", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, help="a toy shield trained on --base toy-sdxl")
    parser.add_argument("--other", required=True, help="the word that replaces the concept's (same kind)")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args(argv)
    result = measure(args.adapter, args.other, args.seeds)
    print("| | " + " | ".join(CONDITIONS) + " |\n|---" + "|---" * len(CONDITIONS) + "|")
    for victim in ("base", "shielded"):
        print(f"| {victim} | " + " | ".join(f"{result[victim][c]:.2f}" for c in CONDITIONS) + " |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
