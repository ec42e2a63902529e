"""Build-time training of the toy pipeline itself: tokenizer, VAE, denoiser (text encoder + UNet).

`training_batch` is shared with the ControlNet's and the toy SDXL's training, which train on the same
latents and prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dt_lora.toy import world
from worlds.toy.training import architecture
from worlds.training import encode_dataset, train_world_vae, warmup_cosine, write_clip_bpe

EXTRA_WORDS = ["the", "with", "and", "on", "in", "background", "grey", "gray", "dark", "light", "big", "small", "one", "shape", "of"]


def _words() -> list[str]:
    templates = (
        world.TRAIN_TEMPLATES
        + world.HELDOUT_TEMPLATES
        + world.SHAPE_ONLY_TEMPLATES
        + world.COLOUR_ONLY_TEMPLATES
    )
    words = set(EXTRA_WORDS) | set(world.SHAPES) | set(world.COLOURS)
    for template in templates:
        words |= set(template.format(shape="", colour="").split())
    return sorted(words)


def build_tokenizer(out: Path) -> None:
    """A CLIP-format BPE whose merges make each toy word one token."""
    write_clip_bpe(out, [" ".join(_words())], vocab_size=100_000,
                   model_max_length=architecture.TOKENIZER_MAX_LENGTH, whole_words=_words())


def train_vae(out: Path, *, steps: int, batch_size: int, seed: int) -> None:
    train_world_vae(out, architecture.make_vae(), world, steps=steps, batch_size=batch_size, seed=seed)


def training_batch(rng: np.random.Generator, latent_mean, latent_std, scale: float, scenes, tokenizer,
                   batch_size: int):
    """Random dataset indices, their latents (sampled from the VAE posterior, scaled) and prompt ids.

    10% empty prompts teach the unconditional branch that classifier-free guidance needs.
    """
    index = torch.from_numpy(rng.integers(0, len(latent_mean), batch_size))
    latents = (latent_mean[index] + latent_std[index] * torch.randn_like(latent_mean[index])) * scale
    prompts = ["" if rng.random() < 0.1 else world.training_prompt(scenes[i], rng) for i in index.tolist()]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return index, latents, ids


def train_denoiser(out: Path, *, steps: int, batch_size: int, dataset_size: int, seed: int) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    text_encoder = CLIPTextModel(
        architecture.text_encoder_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    )
    unet = architecture.make_unet()
    noise_scheduler = DDPMScheduler(**{k: v for k, v in architecture.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})

    images, scenes = world.sample(dataset_size, seed + 1)
    latent_mean, latent_std = encode_dataset(vae, images)
    scale = vae.config.scaling_factor

    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, warmup=200, steps=steps)
    ema_unet = EMAModel(unet.parameters(), decay=0.999)
    ema_text = EMAModel(text_encoder.parameters(), decay=0.999)

    progress = tqdm(range(steps), desc="denoiser")
    for _ in progress:
        index, latents, ids = training_batch(rng, latent_mean, latent_std, scale, scenes, tokenizer, batch_size)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        progress.set_postfix(loss=f"{loss.item():.4f}")

    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    unet.save_pretrained(out / "unet")
    text_encoder.save_pretrained(out / "text_encoder")


def assemble(out: Path) -> None:
    """Write the finished components as one StableDiffusionPipeline folder, weights in float16."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(out / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(out / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(out / "unet"),
        scheduler=DDIMScheduler(**architecture.SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to(torch.float16).save_pretrained(out, safe_serialization=True)
    for config in out.glob("*/config.json"):  # diffusers records the folder it read from: not part of the model
        settings = json.loads(config.read_text())
        if settings.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
