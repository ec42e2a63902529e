"""The toy world's ControlNet: a location map in, the object drawn where and as big as the map says.

Real SD ControlNets are trained copies of the UNet's encoder whose residuals are added into a frozen
UNet, so a shield trained on the UNet must keep working under them. This is the same diffusers
`ControlNetModel`, made with `ControlNetModel.from_unet` from the toy UNet and trained with the recipe
of diffusers' train_controlnet example (frozen UNet and text encoder, epsilon MSE under DDPM noise,
10% empty prompts), so the toy world can test exactly that.

Its condition, `world.location_map`, shows position and size only: whatever shape and colour a
controlled generation draws must still come from the prompt, and so from the (shielded) UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..generate import generate_images
from . import DEFAULT_GUIDANCE, DEFAULT_STEPS, world
from .evaluator import Evaluation, Evaluator, named_concepts
from .quality import EVAL_SEED, concept_prompts

# ControlNetConditioningEmbedding halves the size once per entry after the first: 32×32 maps → 8×8,
# the toy VAE's factor of 4 (SD's (16, 32, 96, 256) divides by 8, for 512 → 64).
CONDITIONING_CHANNELS = (16, 32, 64)
# An object pixel differs from the background (the border's median colour) by more than this (of 255).
OBJECT_THRESHOLD = 48.0


def map_pixels(maps) -> torch.Tensor:
    """uint8 NHWC location maps → float NCHW in [0, 1], what the pipeline's control-image processor feeds
    the ControlNet (it does not normalise to [-1, 1]), so training sees what generation will."""
    return torch.from_numpy(np.ascontiguousarray(maps)).permute(0, 3, 1, 2).float() / 255


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

    from . import architecture
    from .build import _encode_dataset, training_batch, warmup_cosine

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
    latent_mean, latent_std = _encode_dataset(vae, images)
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


# --- generating under control and measuring it ----------------------------------------------


def control_pipeline(pipeline, controlnet):
    """A StableDiffusionControlNetPipeline sharing `pipeline`'s modules: LoRA adapters loaded on its UNet
    (a shield) act in the controlled pipeline too."""
    from diffusers import StableDiffusionControlNetPipeline

    if (controlnet.device, controlnet.dtype) != (pipeline.device, pipeline.unet.dtype):
        controlnet = controlnet.to(device=pipeline.device, dtype=pipeline.unet.dtype)
    controlled = StableDiffusionControlNetPipeline(
        vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer, unet=pipeline.unet,
        controlnet=controlnet, scheduler=pipeline.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    controlled.set_progress_bar_config(disable=True)
    return controlled


def generate_controlled(pipeline, controlnet, prompts: Sequence[str], maps: np.ndarray, *, seed: int,
                        steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                        conditioning_scale: float = 1.0, batch_size: int = 64) -> np.ndarray:
    """`dt_lora.generate.generate_images` under control: image i from prompt i, map i and seed + i.

    `maps` are uint8 NHWC location maps, one per prompt; returns uint8 NHWC.
    """
    if len(maps) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(maps)} maps")
    return generate_images(
        control_pipeline(pipeline, controlnet), prompts, seed=seed, steps=steps, guidance=guidance,
        batch_size=batch_size,
        batch_inputs=lambda batch: {"image": map_pixels(maps[batch]), "controlnet_conditioning_scale": conditioning_scale},
    )


def object_masks(images: np.ndarray) -> np.ndarray:
    """Which pixels of each uint8 NHWC image belong to the object: those far from the border's median
    colour (every toy object lies inside the border, on a flat grey background)."""
    pixels = images.astype(np.float32)
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None, :]
    return np.linalg.norm(pixels - background, axis=-1) > OBJECT_THRESHOLD


def centroids(images: np.ndarray) -> np.ndarray:
    """(x, y) centroid of each image's object in `Scene.centre` coordinates; the image centre if none."""
    masks = object_masks(images)
    coords = np.arange(images.shape[2]) + 0.5
    counts = masks.sum(axis=(1, 2))
    xs = (masks * coords[None, None, :]).sum(axis=(1, 2))
    ys = (masks * coords[None, :, None]).sum(axis=(1, 2))
    middle = images.shape[2] / 2
    return np.stack([np.where(counts > 0, xs / np.maximum(counts, 1), middle),
                     np.where(counts > 0, ys / np.maximum(counts, 1), middle)], axis=1)


def centroid_error(images: np.ndarray, scenes: Sequence[world.Scene]) -> float:
    """Mean distance in pixels between each image's object centroid and its scene's centre."""
    wanted = np.array([scene.centre for scene in scenes])
    return float(np.linalg.norm(centroids(images) - wanted, axis=1).mean())


def control_scenes(per_combination: int) -> tuple[list[str], list[world.Scene]]:
    """The quality prompts (`concept_prompts`) and, for each, a scene of its shape and colour whose
    location map will steer it; seeded from EVAL_SEED, so never a training scene."""
    rng = np.random.default_rng(EVAL_SEED)
    prompts = concept_prompts(per_combination)
    return prompts, [world.random_scene(rng, *named_concepts(p)) for p in prompts]


@dataclass
class ControlQuality:
    controlled: Evaluation
    uncontrolled: Evaluation
    controlled_error: float  # mean centroid error (pixels) of generations under their location maps
    uncontrolled_error: float  # the same scenes' centres against generations without control

    def summary(self) -> dict:
        return {"centroid_error": {"controlled": self.controlled_error, "uncontrolled": self.uncontrolled_error},
                "controlled": self.controlled.summary(), "uncontrolled": self.uncontrolled.summary()}


def measure_control(pipeline, controlnet, evaluator: Evaluator, *, per_combination: int = 4,
                    steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> ControlQuality:
    """Generate every (shape, colour) pair with and without its location map, from the same seeds."""
    prompts, scenes = control_scenes(per_combination)
    maps = world.location_maps([s.centre for s in scenes], [s.radius for s in scenes])
    controlled = generate_controlled(pipeline, controlnet, prompts, maps, seed=EVAL_SEED, steps=steps,
                                     guidance=guidance)
    uncontrolled = generate_images(pipeline, prompts, seed=EVAL_SEED, steps=steps, guidance=guidance)
    return ControlQuality(evaluator.evaluate(controlled, prompts), evaluator.evaluate(uncontrolled, prompts),
                          centroid_error(controlled, scenes), centroid_error(uncontrolled, scenes))
