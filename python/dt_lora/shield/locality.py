"""Text-local shields: the directions of the text encoder's output that only the concept's prompts use.

Cross-attention's `to_k`/`to_v` see nothing but the prompt's token embeddings. A LoRA on them whose
input side (`lora_A`) is fixed to directions d with ‖dᵀx‖ ≈ 0 for every prompt x that is not the
concept's changes only prompts that name the concept, and several such shields add up without
touching the rest: ΔW·x = B·(A·x) ≈ 0 whatever B each shield learnt.

The directions are the top generalised eigenvectors of (C_target, C_retained), the second moments of
the target prompts' token embeddings and of everything that must stay as it is: the anchors, the
empty prompt (classifier-free guidance's other branch) and random word sequences from the tokenizer's
vocabulary without the concept's own words, which stand in for phrasings nobody listed. They maximise
the target's response relative to the retained prompts' (toy world, circle: 1549× in energy for the
first direction; research/).
"""

from __future__ import annotations

import random
import re

import torch

GENERIC_PROMPTS = 2000  # random word sequences in the retained set
GENERIC_SEED = 0
CONTEXT_SEED = 1  # the contexts of `train.prompt_contexts`: other words than the retained set's
CONTEXT_WORDS = 6  # at most, so that a toy prompt (≤ 6 words) and its context fit the 16-token encoder
# `train.target_scale_min = "auto"`: the target is degenerated down to the strength at which its prompts
# answer the directions with this many times the retained prompts' rms. One strength for every concept
# means a different response for each (toy world, at 0.5: circle 14 ×, red 6 ×), and an attack halves the
# response; 6 is where red's shield sits at the default 0.5, which holds six stacked. Given to every
# concept, it holds the circle stacked with red against the attack, but four or more stacked lose
# locality (toy world, research/): an option, not the default.
TARGET_RESPONSE_FLOOR = 6.0
LOWEST_TARGET_STRENGTH = 0.1  # a guard for concepts that answer very strongly: B would have to be huge
LONE_WORD_PROMPTS = 64  # random prompts per key word, to hear whether the shield answers it alone
# A key word whose prompts without the concept's other words answer the shield at this share of what the
# concept's own prompts do is a concept of its own to the shield: those prompts will change too.
LONE_WORD_WARNING = 0.5


def concept_words(target_prompts: list[str], anchor_prompts: list[str]) -> set[str]:
    """Words of the target's prompts that no anchor uses: what makes a prompt the concept's."""
    anchor_words = {w for prompt in anchor_prompts for w in _words(prompt)}
    return {w for prompt in target_prompts for w in _words(prompt)} - anchor_words


def _words(prompt: str) -> list[str]:
    return re.findall(r"[\w']+", prompt.lower())


def vocabulary_words(tokenizer, exclude: set[str]) -> list[str]:
    """The tokenizer's whole words of two letters or more, sorted, none of them in `exclude`."""
    suffix = "</w>"  # CLIP's end-of-word marker: whole words are the tokens that carry it
    return sorted({token[: -len(suffix)] for token in tokenizer.get_vocab()
                   if token.endswith(suffix) and token[: -len(suffix)].isalpha() and len(token) > len(suffix) + 1}
                  - exclude)


def generic_prompts(tokenizer, exclude: set[str], count: int = GENERIC_PROMPTS, seed: int = GENERIC_SEED) -> list[str]:
    """Random sequences of 1–8 whole words from the tokenizer's vocabulary, none of them in `exclude`."""
    words = vocabulary_words(tokenizer, exclude)
    if not words:
        return []
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(count)]


def prompts_in_context(recipe, tokenizer) -> list[str]:
    """`train.prompt_contexts` copies of every target image's prompt, each in a random context: 1–6 words
    of the vocabulary (none of the concept's) before the prompt, seven times in ten, or after it. Copy c
    of image i is item c·N + i (N images; image i has prompt i mod P, as `data.prepare_data` draws them)."""
    prompts, images = recipe.target_prompts, recipe.target.images
    count = recipe.train.prompt_contexts * images
    exclude = concept_words(prompts, recipe.anchor_prompts)
    contexts = generic_prompts(tokenizer, exclude, count=count, seed=CONTEXT_SEED)
    if not contexts:
        return [prompts[j % images % len(prompts)] for j in range(count)]
    rng = random.Random(CONTEXT_SEED)
    out = []
    for j, words in enumerate(contexts):
        prompt = prompts[j % images % len(prompts)]
        context = " ".join(words.split()[:rng.randint(1, CONTEXT_WORDS)])
        out.append(f"{context} {prompt}" if rng.random() < 0.7 else f"{prompt} {context}")
    return out


def second_moment(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, L, D) token embeddings → (D, D) mean of x xᵀ over every token position, in float64."""
    x = embeddings.reshape(-1, embeddings.shape[-1]).double()
    return x.T @ x / len(x)


def text_local_directions(target_embeds: torch.Tensor, retained_embeds: torch.Tensor, count: int,
                          ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` directions (rows, (count, D)) whose response is largest on the target relative to
    the retained prompts, scaled so the retained prompts' mean squared response is 1; and their
    ratios (target's mean squared response ÷ retained's), largest first."""
    target, retained = second_moment(target_embeds), second_moment(retained_embeds)
    d = retained.shape[0]
    # a small ridge keeps the Cholesky factor well conditioned where the retained prompts have no energy
    retained = retained + ridge * retained.trace() / d * torch.eye(d, dtype=retained.dtype)
    whiten = torch.linalg.inv(torch.linalg.cholesky(retained))
    ratios, vectors = torch.linalg.eigh(whiten @ target @ whiten.T)
    order = ratios.argsort(descending=True)[:count]
    directions = (whiten.T @ vectors[:, order]).T  # dᵀ C_retained d = 1
    return directions.float(), ratios[order].float()


def weakest_target_strength(directions: torch.Tensor, target_embeds: torch.Tensor) -> float:
    """The strength down to which the target is degenerated when `train.target_scale_min` is "auto": where
    the target's prompts (`target_embeds`, (N, L, D)) answer `directions` with `TARGET_RESPONSE_FLOOR` × the
    retained prompts' rms (1, as `text_local_directions` scales them); at most 1."""
    x = target_embeds.reshape(-1, target_embeds.shape[-1]).double()
    rms = (x @ directions.double().T).pow(2).mean().sqrt().item()
    return min(1.0, max(LOWEST_TARGET_STRENGTH, TARGET_RESPONSE_FLOOR / rms))


def _peak_response(embeds: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Each prompt's strongest answer to `directions`: the norm of (N, L, D) @ directionsᵀ at its loudest token."""
    return (embeds.float() @ directions.float().T).norm(dim=-1).amax(dim=1)


def lone_word_responses(pipeline, recipe, directions: torch.Tensor,
                        target_embeds: torch.Tensor) -> dict[str, float | None]:
    """The shield's key words (`concept_words`) and, for each ordinary word among them when there are
    several, how strongly prompts that use it and none of the others answer `directions`, as a share of
    the target's prompts' answer. Ordinary: a whole word of the tokenizer's vocabulary, which BPE keeps
    for frequent words ("van" of "Van Gogh"); a rare name it cuts into pieces is nobody else's and gets None.

    A shield of "a blue square" whose anchors name no other blue thing keys on "blue" as much as on
    "square", and then changes every blue thing: its key words are the user's to see before training."""
    from dt_lora.base.family import encode_prompts

    words = sorted(concept_words(recipe.target_prompts, recipe.anchor_prompts))
    ordinary = set(vocabulary_words(pipeline.tokenizer, set())) if len(words) > 1 else set()
    shares: dict[str, float | None] = dict.fromkeys(words)
    if not ordinary & set(words):
        return shares
    target = _peak_response(target_embeds, directions).mean().item()
    contexts = generic_prompts(pipeline.tokenizer, set(words), count=LONE_WORD_PROMPTS, seed=CONTEXT_SEED)
    rng = random.Random(CONTEXT_SEED)
    for word in sorted(ordinary & set(words)):
        prompts = []
        for context in contexts:
            tokens = context.split()
            tokens.insert(rng.randint(0, len(tokens)), word)
            prompts.append(" ".join(tokens))
        shares[word] = _peak_response(encode_prompts(pipeline, prompts).embeds, directions).mean().item() / target
    return shares


def describe_key_words(recipe, shares: dict[str, float | None]) -> tuple[str, list[str]]:
    """The line that says what `recipe`'s shield keys on, and a warning for each ordinary word it answers alone."""
    line = (f"{recipe.name}: the shield keys on {', '.join(repr(w) for w in shares) or 'no word of its own'} "
            "(the target's words that no anchor uses)")
    warnings = [f"{recipe.name}: prompts with {word!r} and none of the concept's other words answer the shield at "
                f"{share:.2f} × the concept's own prompts, so the shield will change them too; add anchors that "
                f"use {word!r} without the concept" for word, share in shares.items()
                if share is not None and share >= LONE_WORD_WARNING]
    return line, warnings


def _direction_prompts(pipeline, recipe) -> tuple[list[str], list[str]]:
    """(the prompts whose text the shield listens to, the prompts it must not): the target's prompts, in
    their contexts too; the anchors, the empty prompt and random word sequences without the concept's words."""
    exclude = concept_words(recipe.target_prompts, recipe.anchor_prompts)
    retained = recipe.anchor_prompts + [""] + generic_prompts(pipeline.tokenizer, exclude)
    return recipe.target_prompts + prompts_in_context(recipe, pipeline.tokenizer), retained


def encode_direction_prompts(pipeline, recipe):
    """The encoded (target, retained) prompts of `_direction_prompts`: what `shield_directions` and
    `pooled_directions` compute from, encoded once when a shield needs both (a few thousand prompts)."""
    from dt_lora.base.family import encode_prompts
    from dt_lora.recipe import RecipeError

    width = pipeline.unet.config.cross_attention_dim  # SDXL: both text encoders' widths, concatenated
    if recipe.lora.rank > width:
        raise RecipeError(f"{recipe.name}: lora.rank: a text-local shield has at most one direction per text "
                          f"embedding dimension ({width}), got {recipe.lora.rank}")
    if not recipe.target_prompts:
        raise RecipeError(f"{recipe.name}: lora.text_local: needs the target's prompts (its words are what the "
                          "shield listens to); give target.prompts or templates, or set lora.text_local = false")
    targets, retained = _direction_prompts(pipeline, recipe)
    return encode_prompts(pipeline, targets), encode_prompts(pipeline, retained)


def pooled_directions(pipeline, recipe, in_features: int, encoded=None) -> torch.Tensor:
    """SDXL: the (rank, in_features) text-local directions of `recipe`'s concept for the UNet's added
    embedding, whose input is [pooled text embedding, size-id features]: directions of the pooled
    embedding that the target's prompts use and the retained prompts do not, zero on the size ids.
    `encoded`: `encode_direction_prompts`' result, if already computed."""
    target, kept = (x.pooled for x in encoded or encode_direction_prompts(pipeline, recipe))
    directions, _ = text_local_directions(target[:, None], kept[:, None], recipe.lora.rank)
    return torch.cat([directions, directions.new_zeros(len(directions), in_features - directions.shape[1])], 1)


def shield_directions(pipeline, recipe, encoded=None) -> torch.Tensor:
    """The (rank, D) text-local directions of `recipe`'s concept on `pipeline`'s text encoder.
    `encoded`: `encode_direction_prompts`' result, if already computed."""
    from dt_lora.base.family import SDXL, encode_for_one_encoder, family

    target_embeds, retained_embeds = (x.embeds for x in encoded or encode_direction_prompts(pipeline, recipe))
    if recipe.train.split_encoders and family(pipeline) == SDXL:
        # listen to the concept in either encoder's half of the states, and not to an anchor in either
        target_embeds = torch.cat([target_embeds, *(encode_for_one_encoder(pipeline, recipe.target_prompts, e).embeds
                                                    for e in (0, 1))])
        retained_embeds = torch.cat([retained_embeds, *(encode_for_one_encoder(pipeline, recipe.anchor_prompts, e).embeds
                                                        for e in (0, 1) if recipe.anchor_prompts)])
    directions, _ = text_local_directions(target_embeds, retained_embeds, recipe.lora.rank)
    return directions
