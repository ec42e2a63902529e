"""Build-time training of the toy SDXL: SDXL's architecture and conditioning on the toy world.

It shares the toy SD's tokenizer (both of its tokenizers: the second pads with "!" as OpenCLIP's does),
VAE and evaluator, and trains its own two text encoders and UNet jointly on the same latents and
prompts, with SDXL's conditioning: both encoders' penultimate hidden states, the second one's pooled
projection and the size ids (32, 32, 0, 0, 32, 32) through the "text_time" embedding. The empty
prompts of classifier-free guidance are zeros, as SDXL base's (`force_zeros_for_empty_prompt`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dt_lora.base.family import encode_ids, ids_for_encoders, unconditional_prompt
from dt_lora.toy import world
from worlds.toy.training import architecture
from worlds.toy.training.model import training_batch
from worlds.training import encode_dataset, warmup_cosine


def _pipeline(sd_dir: Path, text_encoder, text_encoder_2, unet):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(sd_dir / "vae", dtype=torch.float32),
        text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(sd_dir / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(sd_dir / "tokenizer", pad_token="!"),
        unet=unet, scheduler=DDIMScheduler(**architecture.SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True)


def train_sdxl(out: Path, sd_dir: Path, *, steps: int, batch_size: int, dataset_size: int, seed: int) -> None:
    """Train the toy SDXL into `out` (a StableDiffusionXLPipeline folder, weights in float16)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    first, second = architecture.sdxl_text_encoder_configs(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("!"))
    pipeline = _pipeline(sd_dir, CLIPTextModel(first), CLIPTextModelWithProjection(second),
                         architecture.make_sdxl_unet())
    unet, encoders = pipeline.unet, [pipeline.text_encoder, pipeline.text_encoder_2]
    noise_scheduler = DDPMScheduler(**{k: v for k, v in architecture.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})

    images, scenes = world.sample(dataset_size, seed + 1)
    latent_mean, latent_std = encode_dataset(pipeline.vae.eval(), images)
    scale = pipeline.vae.config.scaling_factor

    parameters = list(unet.parameters()) + [p for encoder in encoders for p in encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, warmup=200, steps=steps)
    emas = [EMAModel(model.parameters(), decay=0.999) for model in (unet, *encoders)]

    zeros = unconditional_prompt(pipeline)  # SDXL's unconditional input, for the 10 % "" prompts
    progress = tqdm(range(steps), desc="sdxl denoiser")
    for _ in progress:
        index, latents, ids = training_batch(rng, latent_mean, latent_std, scale, scenes, tokenizer, batch_size)
        prompts = encode_ids(pipeline, ids_for_encoders(pipeline, ids))
        prompts = prompts.where(ids[:, 1] == tokenizer.eos_token_id, zeros)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, **prompts.unet_inputs()).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        for ema, model in zip(emas, (unet, *encoders)):
            ema.step(model.parameters())
        progress.set_postfix(loss=f"{loss.item():.4f}")

    for ema, model in zip(emas, (unet, *encoders)):
        ema.copy_to(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    pipeline.to(torch.float16).save_pretrained(out, safe_serialization=True)
