"""A StableDiffusionPipeline with SD 1.5's exact block layout at toy width, for key-layout tests.

Same block types, counts and depths as SD 1.5 (UNet: 3 × CrossAttnDownBlock2D + DownBlock2D, UpBlock2D +
3 × CrossAttnUpBlock2D, 2 layers per block, UNetMidBlock2DCrossAttn; VAE: 4 encoder/decoder blocks of
2 layers; CLIP text encoder: 12 layers), so it has SD 1.5's key names and counts; only the channel
widths are small. Every weight is drawn at random from a fixed seed, norms and biases included, so no
two tensors of one shape are equal and a swapped name cannot pass an exact comparison.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dt_lora.toy import MODEL_DIR
from worlds.toy.training.architecture import SCHEDULER_CONFIG

TEXT_HIDDEN_SIZE = 32
SEED = 1234


def build(seed: int = SEED):
    """The pipeline, in float32 on CPU, identical for the same `seed`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")  # the toy's vocabulary
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        # SD 1.5: (320, 640, 1280, 1280); widths change where SD's do, so the same resnets get a conv_shortcut
        block_out_channels=(32, 64, 96, 96),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),  # SD 1.5: (128, 256, 512, 512); the same width changes
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=12,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    ))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(torch.float32)


def save(pipeline, folder: str | Path) -> Path:
    """`pipeline` as a diffusers folder (safetensors weights) at `folder`; returns the folder."""
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder
