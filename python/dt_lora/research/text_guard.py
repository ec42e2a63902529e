"""Context guard: a text-encoder LoRA that keeps a concept's text response whatever words come before it.

    python -m dt_lora.research.text_guard train toy-red -o red-guard.safetensors
    python -m dt_lora.research.text_guard bake --adapter toy-circle --adapter toy-red \\
        --guard circle-guard.safetensors --guard red-guard.safetensors -o guarded/
    dt-lora attack --recipe toy-red --shielded guarded/ --methods discrete --no-negative-prompt -o attack/

A text-local shield (locality.py) is a linear gate on the text encoder's output: it degenerates a prompt in
proportion to how strongly the prompt's tokens answer the concept's directions. The attack's free tokens
before the prompt lower that response (on the toy, to a quarter to a half at the end token and padding, where the
concept sits) and the concept comes back. The guard is a LoRA on the text encoder's attention and MLP,
trained on text alone, with three losses:

- invariance: a target prompt after random words (and after the words a text-only attack finds, below)
  answers the shield's directions as the plain prompt does, at the same positions from its end token on;
- preservation: a prompt without the concept's words (the shield's retained prompts: anchors, the empty
  prompt, random word sequences, and anchors joined two or three to a prompt; half of them after random
  words) keeps its output, relative squared change weighted `keep_weight`;
- gate: the same prompts' change along the shield's directions, on the scale of the concept's own response,
  weighted `gate_weight`. Without it a guard raised what the shield gates on, the shield fired a little on
  prompts naming two shapes, and two stacked guards tipped which shape is drawn.

Adversarial rounds are cheap because the inner attack needs no UNet: GCG over `free_tokens` tokens before
each target prompt, lowering the response along the plain prompt's (AdvUnlearn trains the text encoder
for the same reason, against a costlier attack). The UNet shield is left as it is. A guard file holds the
LoRA's A and B per text-encoder module (`text_encoder.<module>.lora_A.weight`, scale alpha/rank = 1);
several guards add up like shields. Measured on the toy world in docs/method.md ("a text encoder that
undoes it" and the two sections after it): with the gate term, one guard and two stacked hold their concepts
against the attack and keep every phrasing group within the locality bar; four stacked do so only when
each guard keeps the other shields' gates too (`stacked_with`). Their attack is not yet measured, so guards
stay research, out of shield files. SD 1.x/2.x only (SDXL's second encoder has no guard yet).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

GUARD_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PREFIX = "text_encoder."


@dataclass
class GuardSettings:
    rounds: int = 3  # adversarial rounds: each adds one found context per target prompt
    steps: int = 600  # optimiser steps per round (and before the first)
    rank: int = 8
    learning_rate: float = 3e-3
    keep_weight: float = 40.0  # 10 tipped two-shape prompts further (docs/method.md, T3)
    batch: int = 32  # target prompts in context per step (twice as many retained prompts)
    free_tokens: int = 8  # the attack's default
    attack_steps: int = 32
    seed: int = 0
    composed: int = 512  # retained prompts that join 2-3 anchors: prompts naming several objects
    gate_weight: float = 40.0  # retained prompts keep their change along the shield's directions (its gate) small


def composed_prompts(anchors: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """`count` prompts that each join 2-3 of `anchors` with " and " or ", " ("a blue circle and a green star"),
    so that preserved prompts name several objects too. On their own they did not stop a guard tipping the
    choice between two named shapes (docs/method.md, "Guards that keep prompts naming several objects")."""
    if len(anchors) < 2:
        return []
    rng = random.Random(seed)
    return [rng.choice((" and ", ", ")).join(rng.sample(list(anchors), rng.randint(2, 3))) for _ in range(count)]


class _Texts:
    """Token-id rows of one length for the text encoder: <bos> context words <eos> <pad>…"""

    def __init__(self, tokenizer):
        self.tokenizer, self.length = tokenizer, tokenizer.model_max_length

    def words(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False, truncation=True, max_length=self.length - 2).input_ids

    def row(self, context: Sequence[int], words: Sequence[int]) -> list[int]:
        body = (list(context) + list(words))[: self.length - 2]
        tok = self.tokenizer
        return [tok.bos_token_id] + body + [tok.eos_token_id] + [tok.pad_token_id] * (self.length - 2 - len(body))

    def batch(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor([list(r) for r in rows])


def _hidden(encoder, ids: torch.Tensor, slots=None, free_embeds=None) -> torch.Tensor:
    """The encoder's last hidden state; with `free_embeds`, the token embeddings at `slots` replaced (the
    attack's one-hot gradient)."""
    from ..attack import token_embeddings_replaced

    with token_embeddings_replaced(encoder, slots, free_embeds) if free_embeds is not None else nullcontext():
        return encoder(input_ids=ids.to(encoder.device))[0]


def response_kept(encoder, base_encoder, directions, texts: _Texts, pairs) -> torch.Tensor:
    """Per (context ids, prompt ids) pair: the prompt's response in context along its plain response, from
    the end token on (the plain prompt's padding at the same positions), as a share of the plain one."""
    shares = []
    with torch.no_grad():
        for context, words in pairs:
            start = 1 + len(context) + len(words)
            seen = _hidden(encoder, texts.batch([texts.row(context, words)]))[:, start:] @ directions.T
            plain = _hidden(base_encoder, texts.batch([texts.row([], words)]))[:, start:] @ directions.T
            shares.append(float((seen * plain).sum() / plain.pow(2).sum()))
    return torch.tensor(shares)


def text_attack(encoder, base_encoder, directions, texts: _Texts, words, allowed: torch.Tensor, k: int,
                generator: torch.Generator, steps: int = 32, candidates: int = 24, top_k: int = 12) -> list[int]:
    """GCG on the text encoder alone: `k` free tokens before `words` that most lower the response along the
    plain prompt's, from the end token on."""
    from ..attack import gcg_swaps

    embeddings = encoder.get_input_embeddings().weight.detach()
    vocabulary = embeddings.shape[0]
    mask = torch.full((vocabulary,), float("inf"))
    mask[allowed] = 0
    start = 1 + k + len(words)
    with torch.no_grad():
        plain = _hidden(base_encoder, texts.batch([texts.row([], words)]))[:, start:] @ directions.T

    def loss(hidden: torch.Tensor) -> torch.Tensor:
        return ((hidden[:, start:] @ directions.T) * plain).sum((1, 2)) / plain.pow(2).sum()

    free = allowed[torch.randint(len(allowed), (k,), generator=generator)]
    slots = list(range(1, 1 + k))
    best, best_loss = free.clone(), float("inf")
    for _ in range(steps):
        one_hot = torch.nn.functional.one_hot(free, vocabulary).to(embeddings).requires_grad_(True)
        value = loss(_hidden(encoder, texts.batch([texts.row(free.tolist(), words)]), slots, (one_hot @ embeddings)[None]))
        (gradient,) = torch.autograd.grad(value.sum(), one_hot)
        trial = gcg_swaps(free, gradient, mask, top_k, candidates, generator)
        with torch.no_grad():
            losses = loss(_hidden(encoder, texts.batch([texts.row(t.tolist(), words) for t in trial])))
        free = trial[int(losses.argmin())]  # GCG: move to the best swap, even when it is worse
        if float(losses.min()) < best_loss:
            best, best_loss = free.clone(), float(losses.min())
    return best.tolist()


def _plain_energy(encoder, texts: _Texts, directions: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The mean squared response of `prompts` along `directions` on their later positions: a concept's scale."""
    late = texts.length // 2  # the toy encoder carries a concept on its later positions; a scale only
    with torch.no_grad():
        hidden = _hidden(encoder, texts.batch([texts.row([], texts.words(p)) for p in prompts]))
    return (hidden[:, late:] @ directions.T).pow(2).sum(-1).mean()


def train_guard(pipeline, recipe, settings: GuardSettings | None = None, log=print,
                stacked_with: Sequence = ()) -> dict[str, torch.Tensor]:
    """The guard's LoRA weights for `recipe`'s shield on `pipeline`'s text encoder (keys as in a guard file).
    `stacked_with`: the recipes of other shields it may be stacked with; the gate term keeps their gates too."""
    import copy

    from peft import LoraConfig, get_peft_model

    from ..attack import allowed_tokens
    from ..family import SDXL, family
    from ..locality import concept_words, generic_prompts, shield_directions

    if family(pipeline) == SDXL:
        raise ValueError("text guards cover SD 1.x/2.x text encoders; SDXL's two encoders have none yet")
    if any(other.name == recipe.name for other in stacked_with):  # its gate would count twice
        raise ValueError(f"stacked with {recipe.name}: that is the guard's own recipe; name the other shields' recipes")
    settings = settings or GuardSettings()
    rng, generator = random.Random(settings.seed), torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    texts = _Texts(pipeline.tokenizer)
    directions = shield_directions(pipeline, recipe).to(pipeline.text_encoder.device)
    words = concept_words(recipe.target_prompts, recipe.anchor_prompts)
    allowed = allowed_tokens(pipeline.tokenizer, sorted(words))
    targets = [texts.words(p) for p in recipe.target_prompts]
    retained = [texts.words(p) for p in recipe.anchor_prompts + [""] + generic_prompts(pipeline.tokenizer, words)
                + composed_prompts(recipe.anchor_prompts, settings.composed, settings.seed)]
    base = pipeline.text_encoder.eval().requires_grad_(False)
    encoder = get_peft_model(copy.deepcopy(base), LoraConfig(r=settings.rank, lora_alpha=settings.rank,
                                                             target_modules=list(GUARD_TARGETS)))
    optimiser = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=0.0)
    room = lambda t: min(settings.free_tokens, texts.length - 2 - len(targets[t]))  # noqa: E731
    random_context = lambda n: [int(allowed[rng.randrange(len(allowed))]) for _ in range(n)]  # noqa: E731
    plain_energy = _plain_energy(base, texts, directions, recipe.target_prompts)
    gates = [(directions, plain_energy)]  # each shield's directions, on the scale of its own concept's response
    for other in stacked_with:
        other_directions = shield_directions(pipeline, other).to(directions.device)
        gates.append((other_directions, _plain_energy(base, texts, other_directions, other.target_prompts)))
    with torch.no_grad():
        kept_energy = _hidden(base, texts.batch([texts.row([], r) for r in retained[:256]])).pow(2).sum(-1).mean()
    found: list[tuple[list[int], int]] = []
    started = time.perf_counter()
    for round_ in range(settings.rounds + 1):
        encoder.train()
        for _ in range(settings.steps):
            samples = []
            for _ in range(settings.batch):
                if found and rng.random() < 0.5:
                    context, t = rng.choice(found)
                else:
                    t = rng.randrange(len(targets))
                    context = random_context(rng.randint(1, room(t))) if rng.random() < 0.9 else []
                samples.append((context, t))
            seen = _hidden(encoder, texts.batch([texts.row(c, targets[t]) for c, t in samples]))
            with torch.no_grad():
                plain = _hidden(base, texts.batch([texts.row([], targets[t]) for _, t in samples]))
            invariance = sum(((seen[i, s:] - plain[i, s:]) @ directions.T).pow(2).sum(-1).mean()
                             for i, s in enumerate(1 + len(c) + len(targets[t]) for c, t in samples))
            invariance = invariance / len(samples) / plain_energy
            kept_rows = []
            for _ in range(2 * settings.batch):
                r = rng.choice(retained)
                kept_rows.append(texts.row(random_context(rng.randint(1, 8)) if rng.random() < 0.5 else [], r))
            kept_ids = texts.batch(kept_rows)
            with torch.no_grad():
                kept_base = _hidden(base, kept_ids)
            kept_change = _hidden(encoder, kept_ids) - kept_base
            preservation = kept_change.pow(2).sum(-1).mean() / kept_energy
            loss = invariance + settings.keep_weight * preservation
            if settings.gate_weight:  # what the shields read, each on the scale of its own concept's response
                gate = sum((kept_change @ d.T).pow(2).sum(-1).mean() / energy for d, energy in gates)
                loss = loss + settings.gate_weight * gate
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        encoder.eval()
        if round_ < settings.rounds:
            found += [(text_attack(encoder, base, directions, texts, targets[t], allowed, room(t), generator,
                                   settings.attack_steps), t) for t in range(len(targets))]
        log(f"round {round_}: invariance {invariance.item():.4f}, preservation {preservation.item():.5f}, "
            + (f"gate {gate.item():.5f}, " if settings.gate_weight else "") + f"{time.perf_counter() - started:.0f} s")
    weights = {}
    for name, module in encoder.base_model.model.named_modules():  # the names of the text encoder's own modules
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            for part in ("lora_A", "lora_B"):
                weights[f"{PREFIX}{name}.{part}.weight"] = getattr(module, part)["default"].weight.detach().float().cpu().contiguous()
    return weights


def write_guard(path: str | Path, weights: dict[str, torch.Tensor], recipe, settings: GuardSettings,
                stacked_with: Sequence = ()) -> Path:
    from safetensors.torch import save

    from ..io import atomic_write

    guard = {"concept": recipe.name, "rank": settings.rank, "alpha": settings.rank, "settings": vars(settings),
             "stacked_with": [other.name for other in stacked_with]}
    metadata = {"format": "pt", "dt_lora": json.dumps({"text_guard": guard})}
    path = Path(path)
    with atomic_write(path) as f:
        f.write(save(weights, metadata=metadata))
    return path


def apply_guards(text_encoder, guards: Sequence[str | Path]) -> None:
    """Add each guard's delta B·A (scale 1) to `text_encoder`'s weights in place."""
    from safetensors import safe_open

    modules = dict(text_encoder.named_modules())
    for guard in guards:
        with safe_open(str(guard), "pt") as f:
            keys = set(f.keys())
            for key in sorted(k for k in keys if k.endswith(".lora_A.weight")):
                name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
                b = key.replace(".lora_A.", ".lora_B.")
                if name not in modules or b not in keys:
                    raise ValueError(f"{guard}: {key}: no such text-encoder module, or no lora_B beside it")
                weight = modules[name].weight
                delta = f.get_tensor(b) @ f.get_tensor(key)
                if delta.shape != weight.shape:
                    raise ValueError(f"{guard}: {name}: delta {tuple(delta.shape)} does not fit {tuple(weight.shape)}")
                with torch.no_grad():
                    weight.add_(delta.to(weight.dtype))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dt_lora.research.text_guard", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a recipe's guard")
    train.add_argument("recipe")
    train.add_argument("-o", "--out", type=Path, required=True)
    train.add_argument("--base", default="toy")
    train.add_argument("--rounds", type=int, default=GuardSettings.rounds)
    train.add_argument("--steps", type=int, default=GuardSettings.steps)
    train.add_argument("--keep-weight", type=float, default=GuardSettings.keep_weight,
                       help="weight of the preservation loss against the invariance loss")
    train.add_argument("--gate-weight", type=float, default=GuardSettings.gate_weight,
                       help="weight of keeping other prompts' response along the shield's directions")
    train.add_argument("--stacked-with", action="append", default=[], metavar="RECIPE",
                       help="another shield's recipe this guard may be stacked with: keep its gate too (repeatable)")
    bake = commands.add_parser("bake", help="bake shields and their guards into a diffusers folder")
    bake.add_argument("--adapter", action="append", required=True)
    bake.add_argument("--guard", action="append", required=True)
    bake.add_argument("-o", "--out", type=Path, required=True)
    bake.add_argument("--base", default="toy")
    args = parser.parse_args(argv)
    try:
        _run(args, parser)
    except (ValueError, OSError) as error:  # a recipe, adapter or guard that does not fit: one line, exit 2
        parser.error(str(error))


def _run(args, parser) -> None:
    from ..base import load_pipeline
    from ..recipe import load_recipe
    from ..recipes import adapter_path, recipe_path

    if args.command == "train":
        recipe = load_recipe(recipe_path(args.recipe))
        settings = GuardSettings(rounds=args.rounds, steps=args.steps, keep_weight=args.keep_weight,
                                 gate_weight=args.gate_weight)
        others = [load_recipe(recipe_path(name)) for name in args.stacked_with]
        pipeline = load_pipeline(args.base)
        weights = train_guard(pipeline, recipe, settings, stacked_with=others)
        print(f"wrote {write_guard(args.out, weights, recipe, settings, stacked_with=others)}")
    else:
        from ..bake import bake as bake_model

        guards = [Path(g) for g in args.guard]
        for guard in guards:
            if not guard.is_file():
                parser.error(f"guard file not found: {guard}")

        def guard(pipeline) -> dict:
            apply_guards(pipeline.text_encoder, guards)
            return {"text_guards": [g.name for g in guards]}

        result = bake_model(args.base, [adapter_path(a) for a in args.adapter], args.out, before_save=guard)
        print(f"wrote {result.out}")


if __name__ == "__main__":
    main()
