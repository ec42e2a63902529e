"""Generating with the toy world's ControlNet: a location map in, the object drawn where and as big as
the map says.

Real SD ControlNets are trained copies of the UNet's encoder whose residuals are added into a frozen
UNet, so a shield trained on the UNet must keep working under them; the toy ControlNet
(`dt_lora.toy.load_controlnet`, trained by `worlds.toy.training.controlnet`) lets the toy world test
exactly that. Its condition, `world.location_map`, shows position and size only: whatever shape and
colour a controlled generation draws must still come from the prompt, and so from the (shielded) UNet.
`dt_lora.toy.quality.measure_control` measures how well it steers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dt_lora.base.generate import generate_images
from dt_lora.toy import DEFAULT_GUIDANCE, DEFAULT_STEPS


def map_pixels(maps) -> torch.Tensor:
    """uint8 NHWC location maps → float NCHW in [0, 1], what the pipeline's control-image processor feeds
    the ControlNet (it does not normalise to [-1, 1]), so training sees what generation will."""
    return torch.from_numpy(np.ascontiguousarray(maps)).permute(0, 3, 1, 2).float() / 255


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
    """`dt_lora.base.generate.generate_images` under control: image i from prompt i, map i and seed + i.

    `maps` are uint8 NHWC location maps, one per prompt; returns uint8 NHWC.
    """
    if len(maps) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(maps)} maps")
    return generate_images(
        control_pipeline(pipeline, controlnet), prompts, seed=seed, steps=steps, guidance=guidance,
        batch_size=batch_size,
        batch_inputs=lambda batch: {"image": map_pixels(maps[batch]), "controlnet_conditioning_scale": conditioning_scale},
    )
