"""Context guard: the text-encoder part of a shield, which keeps the concept's text response whatever
words come before its prompt.

    dt-lora train toy-red --guard-enabled true                      # recipe: [guard] enabled = true
    dt-lora train toy-red --guard-enabled true --guard-stacked-with toy-circle

A text-local shield (locality.py) is a linear gate on the text encoder's output: it degenerates a prompt in
proportion to how strongly the prompt's tokens answer the concept's directions. An attack's free tokens
before the prompt lower that response (on the toy, to a quarter to a half at the end token and padding,
where the concept sits) and the concept comes back. The guard is a LoRA on the text encoder's attention and
MLP, trained on text alone (no UNet, no images), with three losses:

- invariance: a target prompt after random words (and after the words a text-only attack finds, below)
  answers the shield's directions as the plain prompt does, at the same positions from its end token on;
- preservation: a prompt without the concept's words (the shield's retained prompts: anchors, the empty
  prompt, random word sequences, and anchors joined two or three to a prompt; half of them after random
  words) keeps its output, relative squared change weighted `keep_weight`;
- gate: the same prompts' change along the shield's directions, and along those of every shield in
  `stacked_with`, each on the scale of its own concept's response, weighted `gate_weight`. Without it a
  guard raised what the shields gate on, they fired a little on prompts naming two shapes, and stacked
  guards tipped which shape is drawn.

Adversarial rounds are cheap because the inner attack needs no UNet: GCG over `free_tokens` tokens before
each target prompt, lowering the response along the plain prompt's (AdvUnlearn trains the text encoder for
the same reason, against a costlier attack). The guard is the adapter file's `text_encoder.*` part
(adapters.py): diffusers loads it with the UNet part, stacking and merging add guards like shields, bake
fuses them into the text encoder. Measured on the toy world in docs/method.md (T5, T6). SD 1.x/2.x only
(SDXL's second encoder has no guard yet).
"""

from __future__ import annotations

import copy
import random
import time
from contextlib import nullcontext
from typing import Sequence

import torch

from .adapters import AdapterFile

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


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
    from .attack import token_embeddings_replaced

    with token_embeddings_replaced(encoder, slots, free_embeds) if free_embeds is not None else nullcontext():
        return encoder(input_ids=ids.to(encoder.device))[0].float()


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
    from .attack import gcg_swaps

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


def check_stacked_with(recipe, stacked_with: Sequence) -> None:
    """Refuse the guard's own recipe among `stacked_with` (loaded recipes: a path to it too): its gate would
    count twice."""
    if any(other.name == recipe.name for other in stacked_with):
        raise ValueError(f"stacked with {recipe.name}: that is the guard's own recipe; name the other shields' recipes")


def train_guard(pipeline, recipe, stacked_with: Sequence = (), log=print) -> AdapterFile:
    """The guard of `recipe`'s shield on `pipeline`'s text encoder, with `recipe.guard`'s settings: the
    adapter file's text-encoder part. `stacked_with`: the recipes of the shields it may be stacked with."""
    from peft import LoraConfig, get_peft_model

    from .attack import allowed_tokens
    from .family import SDXL, family
    from .locality import concept_words, generic_prompts, shield_directions

    if family(pipeline) == SDXL:
        raise ValueError("text guards cover SD 1.x/2.x text encoders; SDXL's two encoders have none yet")
    check_stacked_with(recipe, stacked_with)
    settings = recipe.guard
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
    config = LoraConfig(r=settings.rank, lora_alpha=settings.rank, target_modules=list(TARGETS))
    encoder = get_peft_model(copy.deepcopy(base).float(), config)  # float32 LoRA weights on a half-precision base
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
        plain_hidden = _hidden(base, texts.batch([texts.row([], t) for t in targets]))  # each target, once
        kept_energy = _hidden(base, texts.batch([texts.row([], r) for r in retained[:256]])).pow(2).sum(-1).mean()
    found: list[tuple[list[int], int]] = []
    log(f"{len(targets)} target prompts, {len(retained)} retained prompts")
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
            kept_rows = []
            for _ in range(2 * settings.batch):
                r = rng.choice(retained)
                kept_rows.append(texts.row(random_context(rng.randint(1, 8)) if rng.random() < 0.5 else [], r))
            with torch.no_grad():
                kept_base = _hidden(base, texts.batch(kept_rows))
            # one pass of the guarded encoder over both: the tiny toy encoder's step is mostly call overhead
            hidden = _hidden(encoder, texts.batch([texts.row(c, targets[t]) for c, t in samples] + kept_rows))
            seen, kept_change = hidden[:len(samples)], hidden[len(samples):] - kept_base
            plain = plain_hidden[[t for _, t in samples]]
            invariance = sum(((seen[i, s:] - plain[i, s:]) @ directions.T).pow(2).sum(-1).mean()
                             for i, s in enumerate(1 + len(c) + len(targets[t]) for c, t in samples))
            invariance = invariance / len(samples) / plain_energy
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
                weights[f"{name}.{part}.weight"] = getattr(module, part)["default"].weight.detach().float().cpu().contiguous()
    return AdapterFile(weights, {"r": settings.rank, "lora_alpha": settings.rank, "target_modules": sorted(TARGETS)})
