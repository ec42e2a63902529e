"""Training the toy world's ControlNet (the `controlnet` stage of `python -m worlds.toy.build`).

A diffusers `ControlNetModel`, made with `ControlNetModel.from_unet` from the toy UNet and trained with
the recipe of diffusers' train_controlnet example (frozen UNet and text encoder, epsilon MSE under DDPM
noise, 10% empty prompts); `dt_lora.toy.controlnet` generates with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dt_lora.toy import world
from dt_lora.toy.controlnet import map_pixels
from worlds.toy.training import architecture
from worlds.toy.training.model import training_batch
from worlds.training import encode_dataset, warmup_cosine

# ControlNetConditioningEmbedding halves the size once per entry after the first: 32×32 maps → 8×8,
# the toy VAE's factor of 4 (SD's (16, 32, 96, 256) divides by 8, for 512 → 64).
CONDITIONING_CHANNELS = (16, 32, 64)


def train_controlnet(out: Path, *, steps: int, batch_size: int, dataset_size: int, seed: int,
                     lr: float = 1e-3):
    """Train a ControlNet for the shipped toy pipeline in `out` and save it to `out/controlnet` (float16).

    Only the ControlNet learns; the pipeline's files are read, never written. SD's ControlNets train at
    lr 1e-5 for days; the toy's zero convolutions must open within minutes, so it takes the denoiser's
    1e-3. The build's 1200 steps of 64 take about 6 minutes on one CPU thread (two threads on two busy
    cores were 40× slower); 300 steps already brought the centroid error from 4.7 to 0.8 pixels.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    # the shipped weights are float16; train in float32 on CPU
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch.float32).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(out / "vae", dtype=torch.float32).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(out / "unet", dtype=torch.float32).eval().requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS).train()
    noise_scheduler = DDPMScheduler(
        **{k: v for k, v in architecture.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})

    images, scenes = world.sample(dataset_size, seed + 1)
    maps = map_pixels(world.location_maps([s.centre for s in scenes], [s.radius for s in scenes]))
    latent_mean, latent_std = encode_dataset(vae, images)
    scale = vae.config.scaling_factor

    parameters = list(controlnet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, warmup=100, steps=steps)
    progress = tqdm(range(steps), desc="controlnet")
    for _ in progress:
        # 10% empty prompts, as in train_controlnet: the map must work for the unconditional branch too
        index, latents, ids = training_batch(rng, latent_mean, latent_std, scale, scenes, tokenizer, batch_size)
        with torch.no_grad():
            text = text_encoder(ids).last_hidden_state
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        down, mid = controlnet(noisy, timesteps, text, controlnet_cond=maps[index], return_dict=False)
        prediction = unet(noisy, timesteps, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")

    controlnet.to(torch.float16).save_pretrained(out / "controlnet", safe_serialization=True)
    return controlnet
