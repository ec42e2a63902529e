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
fuses them into the text encoder. Measured on the toy world in research/guard-preservation.md.

SDXL: both text encoders get a LoRA (the file's `text_encoder.*` and `text_encoder_2.*` parts), trained
together on what the UNet reads: their penultimate states, concatenated, along the shield's directions; and
the pooled embedding, kept for the retained prompts like their states.
"""

from __future__ import annotations

import copy
import random
import time
from contextlib import ExitStack
from typing import Sequence

import torch

from dt_lora.adapters import AdapterFile
from dt_lora.base.family import encoder_outputs, ids_for_encoders

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
    """Token-id rows of one length for the text encoders: <bos> context words <eos> <pad>…"""

    def __init__(self, pipeline):
        self.pipeline, self.tokenizer = pipeline, pipeline.tokenizer
        self.length = self.tokenizer.model_max_length

    def words(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False, truncation=True, max_length=self.length - 2).input_ids

    def row(self, context: Sequence[int], words: Sequence[int]) -> list[int]:
        body = (list(context) + list(words))[: self.length - 2]
        tok = self.tokenizer
        return [tok.bos_token_id] + body + [tok.eos_token_id] + [tok.pad_token_id] * (self.length - 2 - len(body))

    def batch(self, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The rows' ids for each text encoder (SDXL's second pads otherwise)."""
        return ids_for_encoders(self.pipeline, torch.tensor([list(r) for r in rows]))


def _encoded(encoders, ids: list[torch.Tensor], slots=None, one_hot=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the states the UNet reads, SDXL's pooled embedding or None), float32; with `one_hot` ((k, V)), each
    encoder's token embeddings at `slots` replaced by `one_hot` times its embedding matrix (the attack's
    gradient)."""
    from dt_lora.search import token_embeddings_replaced

    with ExitStack() as stack:
        for encoder in encoders if one_hot is not None else ():
            free = (one_hot @ encoder.get_input_embeddings().weight.detach())[None]
            stack.enter_context(token_embeddings_replaced(encoder, slots, free))
        states, pooled = encoder_outputs(encoders, ids)
    return states.float(), None if pooled is None else pooled.float()


def _hidden(encoders, ids: list[torch.Tensor], slots=None, one_hot=None) -> torch.Tensor:
    """The states the UNet reads (SD: the last hidden state; SDXL: both penultimate ones), float32."""
    return _encoded(encoders, ids, slots, one_hot)[0]


def response_kept(guarded, base, directions, texts: _Texts, pairs) -> torch.Tensor:
    """Per (context ids, prompt ids) pair: the prompt's response in context along its plain response, from
    the end token on (the plain prompt's padding at the same positions), as a share of the plain one.
    `guarded`, `base`: lists of text encoders, as `_hidden` takes them."""
    shares = []
    with torch.no_grad():
        for context, words in pairs:
            start = 1 + len(context) + len(words)
            seen = _hidden(guarded, texts.batch([texts.row(context, words)]))[:, start:] @ directions.T
            plain = _hidden(base, texts.batch([texts.row([], words)]))[:, start:] @ directions.T
            shares.append(float((seen * plain).sum() / plain.pow(2).sum()))
    return torch.tensor(shares)


def text_attack(guarded, base, directions, texts: _Texts, words, allowed: torch.Tensor, k: int,
                generator: torch.Generator, steps: int = 32, candidates: int = 24, top_k: int = 12) -> list[int]:
    """GCG on the text encoders alone (`guarded`, `base`: lists, as `_hidden` takes them): `k` free
    tokens before `words` that most lower the response along the plain prompt's, from the end token on."""
    from dt_lora.search import gcg_swaps

    embeddings = guarded[0].get_input_embeddings().weight.detach()
    vocabulary = embeddings.shape[0]
    mask = torch.full((vocabulary,), float("inf"))
    mask[allowed] = 0
    start = 1 + k + len(words)
    with torch.no_grad():
        plain = _hidden(base, texts.batch([texts.row([], words)]))[:, start:] @ directions.T

    def loss(hidden: torch.Tensor) -> torch.Tensor:
        return ((hidden[:, start:] @ directions.T) * plain).sum((1, 2)) / plain.pow(2).sum()

    free = allowed[torch.randint(len(allowed), (k,), generator=generator)]
    slots = list(range(1, 1 + k))
    best, best_loss = free.clone(), float("inf")
    for _ in range(steps):
        one_hot = torch.nn.functional.one_hot(free, vocabulary).to(embeddings).requires_grad_(True)
        value = loss(_hidden(guarded, texts.batch([texts.row(free.tolist(), words)]), slots, one_hot))
        (gradient,) = torch.autograd.grad(value.sum(), one_hot)
        trial = gcg_swaps(free, gradient, mask, top_k, candidates, generator)
        with torch.no_grad():
            losses = loss(_hidden(guarded, texts.batch([texts.row(t.tolist(), words) for t in trial])))
        free = trial[int(losses.argmin())]  # GCG: move to the best swap, even when it is worse
        if float(losses.min()) < best_loss:
            best, best_loss = free.clone(), float(losses.min())
    return best.tolist()


def _plain_energy(encoders, texts: _Texts, directions: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The mean squared response of `prompts` along `directions` on their later positions: a concept's scale."""
    late = texts.length // 2  # the toy encoder carries a concept on its later positions; a scale only
    with torch.no_grad():
        hidden = _hidden(encoders, texts.batch([texts.row([], texts.words(p)) for p in prompts]))
    return (hidden[:, late:] @ directions.T).pow(2).sum(-1).mean()


def check_stacked_with(recipe, stacked_with: Sequence) -> None:
    """Refuse the guard's own recipe among `stacked_with` (loaded recipes: a path to it too): its gate would
    count twice."""
    if any(other.name == recipe.name for other in stacked_with):
        raise ValueError(f"stacked with {recipe.name}: that is the guard's own recipe; name the other shields' recipes")


def train_guard(pipeline, recipe, stacked_with: Sequence = (), log=print) -> dict[str, AdapterFile]:
    """The guard of `recipe`'s shield on `pipeline`'s text encoders, with `recipe.guard`'s settings: the
    adapter file's text-encoder parts, by component name ("text_encoder", SDXL's "text_encoder_2").
    `stacked_with`: the recipes of the shields it may be stacked with.

    One function, read top to bottom as diffusers' training scripts are: the set-up, then the rounds of
    steps and text attacks. Its random draws come in one order from one seed, which a split into helpers
    would have to thread through."""
    from peft import LoraConfig, get_peft_model

    from dt_lora.adapters import pipeline_text_encoders
    from dt_lora.search import allowed_tokens
    from dt_lora.shield.locality import concept_words, generic_prompts, shield_directions

    check_stacked_with(recipe, stacked_with)
    settings = recipe.guard
    rng, generator = random.Random(settings.seed), torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    texts = _Texts(pipeline)
    directions = shield_directions(pipeline, recipe).to(pipeline.text_encoder.device)
    words = concept_words(recipe.target_prompts, recipe.anchor_prompts)
    allowed = allowed_tokens(pipeline.tokenizer, sorted(words))
    targets = [texts.words(p) for p in recipe.target_prompts]
    retained = [texts.words(p) for p in recipe.anchor_prompts + [""] + generic_prompts(pipeline.tokenizer, words)
                + composed_prompts(recipe.anchor_prompts, settings.composed, settings.seed)]
    names = list(pipeline_text_encoders(pipeline))
    base = [getattr(pipeline, name).eval().requires_grad_(False) for name in names]
    # float32 LoRA weights on a half-precision base; a config each (peft records its model in it)
    guarded = [get_peft_model(copy.deepcopy(model).float(),
                              LoraConfig(r=settings.rank, lora_alpha=settings.rank, target_modules=list(TARGETS)))
               for model in base]
    optimiser = torch.optim.AdamW([p for model in guarded for p in model.parameters() if p.requires_grad],
                                  lr=settings.learning_rate, weight_decay=0.0)
    room = lambda t: min(settings.free_tokens, texts.length - 2 - len(targets[t]))  # noqa: E731
    random_context = lambda n: [int(allowed[rng.randrange(len(allowed))]) for _ in range(n)]  # noqa: E731
    plain_energy = _plain_energy(base, texts, directions, recipe.target_prompts)
    gates = [(directions, plain_energy)]  # each shield's directions, on the scale of its own concept's response
    for other in stacked_with:
        other_directions = shield_directions(pipeline, other).to(directions.device)
        gates.append((other_directions, _plain_energy(base, texts, other_directions, other.target_prompts)))
    with torch.no_grad():
        plain_hidden = _hidden(base, texts.batch([texts.row([], t) for t in targets]))  # each target, once
        kept_states, kept_pooled = _encoded(base, texts.batch([texts.row([], r) for r in retained[:256]]))
        kept_energy = kept_states.pow(2).sum(-1).mean()
        pooled_energy = kept_pooled.pow(2).sum(-1).mean() if kept_pooled is not None else None
    found: list[tuple[list[int], int]] = []
    log(f"{len(targets)} target prompts, {len(retained)} retained prompts")
    started = time.perf_counter()
    for round_ in range(settings.rounds + 1):
        for model in guarded:
            model.train()
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
                kept_base, kept_base_pooled = _encoded(base, texts.batch(kept_rows))
            # one pass of the guarded encoder over both: the tiny toy encoder's step is mostly call overhead
            hidden, pooled = _encoded(guarded, texts.batch([texts.row(c, targets[t]) for c, t in samples] + kept_rows))
            seen, kept_change = hidden[:len(samples)], hidden[len(samples):] - kept_base
            plain = plain_hidden[[t for _, t in samples]]
            invariance = sum(((seen[i, s:] - plain[i, s:]) @ directions.T).pow(2).sum(-1).mean()
                             for i, s in enumerate(1 + len(c) + len(targets[t]) for c, t in samples))
            invariance = invariance / len(samples) / plain_energy
            preservation = kept_change.pow(2).sum(-1).mean() / kept_energy
            if pooled is not None:  # SDXL: the same prompts' pooled embedding, on its own scale
                pooled_change = pooled[len(samples):] - kept_base_pooled
                preservation = preservation + pooled_change.pow(2).sum(-1).mean() / pooled_energy
            loss = invariance + settings.keep_weight * preservation
            if settings.gate_weight:  # what the shields read, each on the scale of its own concept's response
                gate = sum((kept_change @ d.T).pow(2).sum(-1).mean() / energy for d, energy in gates)
                loss = loss + settings.gate_weight * gate
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        for model in guarded:
            model.eval()
        if round_ < settings.rounds:
            found += [(text_attack(guarded, base, directions, texts, targets[t], allowed, room(t), generator,
                                   settings.attack_steps), t) for t in range(len(targets))]
        log(f"round {round_}: invariance {invariance.item():.4f}, preservation {preservation.item():.5f}, "
            + (f"gate {gate.item():.5f}, " if settings.gate_weight else "") + f"{time.perf_counter() - started:.0f} s")
    return {name: _lora_part(model, settings.rank) for name, model in zip(names, guarded)}


def _lora_part(model, rank: int) -> AdapterFile:
    """A guarded encoder's LoRA weights, keyed by the text encoder's own module paths."""
    weights = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            for part in ("lora_A", "lora_B"):
                weights[f"{name}.{part}.weight"] = getattr(module, part)["default"].weight.detach().float().cpu().contiguous()
    return AdapterFile(weights, {"r": rank, "lora_alpha": rank, "target_modules": sorted(TARGETS)})
