"""The loss of one training step, and the switches it needs on the UNet's adapter.

    loss = mse(unet_lora(noisy scrambled target, t, target prompt), noise)          # target_loss
         + w · mse(unet_lora(noisy anchor, t, anchor prompt), unet_base(same inputs))  # anchor_loss

The preservation term distils the frozen base model (the same UNet with the adapter switched off) on the
anchors' noisy latents. The batch of each step is drawn from a generator seeded by (seed, step, process),
so a resumed run replays the same batches as an uninterrupted one.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from dt_lora.base.family import (
    training_target,
)
from dt_lora.data import ConceptData
from dt_lora.recipe import Recipe

ADAPTER_NAME = "dt_lora"  # the name the adapter has on the UNet while it trains


@contextmanager
def adapter_strength(layers, name: str, strength: float) -> Iterator[None]:
    """Run the block with adapter `name` at `strength` on every LoRA layer in `layers`.

    The strength goes back to 1 (the trained scale, alpha/rank) when the block ends, also on error,
    so that a failed step never leaves the adapter at a random strength for the next one.
    """
    for layer in layers:
        layer.set_scale(name, strength)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_scale(name, 1.0)


@contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """Run the block on the frozen base model: the UNet with its adapters switched off, then on again.

    peft's `enable_adapters` makes every adapter weight trainable again; the flags are put back as they
    were, so a text-local shield's fixed lora_A stays frozen (gradient checkpointing would otherwise
    recompute a step's forward pass with other tensors than it saved)."""
    trainable = [(parameter, parameter.requires_grad) for name, parameter in unet.named_parameters() if ".lora_" in name]
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)


# --- checkpoints --------------------------------------------------------------------------------


@dataclass
class StepContext:
    """What every loss term of a step needs. New terms are functions of (context, generator) like
    `target_loss` and `anchor_loss`, listed by `loss_terms`; each draws its randomness from the
    step's generator, in a fixed order, so that a resumed run replays the same batches."""

    recipe: Recipe
    unet: torch.nn.Module  # as prepared by accelerate: the one that takes gradients
    base_unet: torch.nn.Module  # the same model unwrapped: adapters can be switched off on it
    lora_layers: list  # peft LoraLayers carrying the adapter, for `adapter_strength`
    data: ConceptData
    scheduler: Any  # the pipeline's: its noise schedule and prediction type
    alphas_cumprod: torch.Tensor  # on `device`
    num_timesteps: int
    device: torch.device
    autocast: Callable  # accelerator.autocast

    def add_noise(self, latents: torch.Tensor, generator: torch.Generator):
        """(noisy latents, what the UNet should predict, timesteps) at random timesteps, as the DDPM
        forward process; the prediction target is the noise, or the velocity for v-prediction models."""
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, self.num_timesteps, (latents.shape[0],), generator=generator)
        a = self.alphas_cumprod[t.to(self.device)].view(-1, 1, 1, 1)
        latents, noise = latents.to(self.device), noise.to(self.device)
        target = training_target(self.scheduler, latents, noise, a)
        return a.sqrt() * latents + (1 - a).sqrt() * noise, target, t.to(self.device)


class LossTerm(NamedTuple):
    value: torch.Tensor
    strength: float  # the adapter strength the term was computed at, and must be back-propagated at


def target_loss(ctx: StepContext, generator: torch.Generator) -> LossTerm:
    """Degenerate: the adapted UNet learns to denoise the concept's Scrambled Grids."""
    data, batch = ctx.data, ctx.recipe.train.batch_size
    index = torch.randint(0, len(data.target_latents), (batch,), generator=generator)
    x, target, t = ctx.add_noise(data.target_latents[index], generator)
    strength = 1.0
    if ctx.recipe.train.target_scale_min < 1:
        # degenerate also at a weaker strength: a phrasing nobody listed moves the shield's text
        # directions less than the recipe's own prompts do (see recipe.py)
        low = ctx.recipe.train.target_scale_min
        strength = low + (1 - low) * float(torch.rand((), generator=generator))
    with ctx.autocast(), adapter_strength(ctx.lora_layers, ADAPTER_NAME, strength):
        prediction = ctx.unet(x, t, **data.target_prompts[index].to(ctx.device).unet_inputs()).sample
    return LossTerm(F.mse_loss(prediction.float(), target.float()), strength)


def anchor_loss(ctx: StepContext, generator: torch.Generator) -> LossTerm:
    """Preserve: on the anchors, the adapted UNet matches the frozen base ("distill") or the noise ("denoise")."""
    data, train = ctx.data, ctx.recipe.train
    index = torch.randint(0, len(data.anchor_latents), (train.batch_size,), generator=generator)
    x, target, t = ctx.add_noise(data.anchor_latents[index], generator)
    unconditional = torch.rand(train.batch_size, generator=generator) < train.unconditional_share
    prompts = data.anchor_prompts[index].where(unconditional, data.unconditional).to(ctx.device).unet_inputs()
    with ctx.autocast():
        if train.preservation == "distill":
            with torch.no_grad(), adapters_disabled(ctx.base_unet):
                reference = ctx.base_unet(x, t, **prompts).sample.float()
        else:
            reference = target.float()
        strength = 1.0
        if train.anchor_scale_jitter:
            # preserve the anchors at a random strength of the adapter, not only at 1 (see recipe.py)
            strength = 1 + train.anchor_scale_jitter * float(torch.rand((), generator=generator))
        with adapter_strength(ctx.lora_layers, ADAPTER_NAME, strength):
            prediction = ctx.unet(x, t, **prompts).sample
    return LossTerm(train.preservation_weight * F.mse_loss(prediction.float(), reference), strength)


def loss_terms(ctx: StepContext) -> list[Callable[[StepContext, torch.Generator], LossTerm]]:
    """The loss terms of a step, in the order they draw from its generator."""
    terms = [target_loss]
    if ctx.recipe.train.preservation != "none" and len(ctx.data.anchor_latents) > 0:
        terms.append(anchor_loss)
    return terms


def accumulate_gradients(ctx: StepContext, accelerator, generator: torch.Generator) -> float:
    """Compute each loss term and back-propagate it at once; return the step's loss.

    Each term is back-propagated at the adapter strength it was computed at: gradient checkpointing
    recomputes the forward pass during the backward one, and must see the same strength. Under
    data-parallel training (DistributedDataParallel) every term but the last runs under `no_sync`, so
    its gradients accumulate locally and the last backward averages the sum across processes once.
    """
    terms = loss_terms(ctx)
    total = 0.0
    for i, compute in enumerate(terms):
        with accelerator.no_sync(ctx.unet) if i < len(terms) - 1 else nullcontext():
            term = compute(ctx, generator)
            with adapter_strength(ctx.lora_layers, ADAPTER_NAME, term.strength):
                accelerator.backward(term.value)
        total += term.value.item()
    return total


def step_generator(recipe: Recipe, step: int, process_index: int) -> torch.Generator:
    """The randomness of one step on one process: the same whether the run was resumed or not."""
    return torch.Generator().manual_seed((recipe.train.seed * 1_000_003 + step) * 64 + process_index)


@contextmanager
def update_uninterrupted() -> Iterator[None]:
    """Ctrl-C inside the block is delivered when it ends. The checkpoint written on Ctrl-C then records the
    weights, optimizer state and step count of one and the same update: inside `optimizer.step()`, or between
    it and the step count, it would resume from half an update or replay one (the likely cause of a resumed
    run that once differed from an uninterrupted one in CI)."""
    held: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    except ValueError:  # not the main thread, where Python never delivers signals anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)  # to the handler that was there: KeyboardInterrupt, or ignored


# --- training -----------------------------------------------------------------------------------
