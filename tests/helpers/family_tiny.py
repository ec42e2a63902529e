"""Pipelines with SDXL's and SD 2.x's exact block layouts at toy width, for family tests.

As sd15_tiny.py does for SD 1.5: the same block types, counts, depths and text-encoder layer counts as
the real models, so key names and counts are theirs; only widths are small. Weights are drawn at random
from a fixed seed (norms and biases too), so a swapped name cannot pass an exact comparison.

- SDXL (base 1.0): UNet down DownBlock2D + 2 × CrossAttnDownBlock2D with 1, 2 and 10 transformer layers,
  the mirror going up, 2 layers per block, linear projections, the "text_time" added embedding; CLIP-L
  (12 layers) and OpenCLIP-G (32 layers, with projection); the VAE of SD.
- SD 2.1: SD 1.5's UNet blocks with linear projections and upcast attention; OpenCLIP-H as diffusers
  keeps it (23 layers); v-prediction (768) or epsilon (base).
"""

from __future__ import annotations

import torch

from dt_lora.toy import MODEL_DIR
from worlds.toy.training.architecture import SCHEDULER_CONFIG

SEED = 4321
TIME_EMBED = 8  # SDXL: addition_time_embed_dim 256


def _tokenizer(**overrides):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer", **overrides)  # the toy's vocabulary


def _text_encoder(tokenizer, hidden: int, layers: int, *, projection: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=4, hidden_act=act,
                            max_position_embeddings=tokenizer.model_max_length, projection_dim=projection or hidden,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64),
                         layers_per_block=2, latent_channels=4, norm_num_groups=16, sample_size=64,
                         scaling_factor=scaling_factor)


def _randomise(seed: int, *models) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def build_sdxl(seed: int = SEED):
    """A `StableDiffusionXLPipeline` with SDXL base's layout, float32 on CPU, 64×64 images."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer(pad_token="!")  # OpenCLIP pads with "!" (id 0), CLIP-L with its end token
    text_encoder = _text_encoder(tokenizer, 32, 12)
    text_encoder_2 = _text_encoder(tokenizer_2, 48, 32, projection=40, act="gelu")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 96),  # SDXL: (320, 640, 1280)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), norm_num_groups=16,
        cross_attention_dim=32 + 48, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + 40,
    )
    vae = _vae(0.13025)
    _randomise(seed, unet, vae, text_encoder, text_encoder_2)
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                          if k not in ("clip_sample", "set_alpha_to_one")})
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_sd2(seed: int = SEED, *, prediction_type: str = "v_prediction"):
    """A `StableDiffusionPipeline` with SD 2.1's layout (v-prediction, as 2.1-768), float32 on CPU."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _tokenizer(pad_token="!")  # SD 2.x's OpenCLIP tokenizer pads with "!"
    text_encoder = _text_encoder(tokenizer, 48, 23, act="gelu")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 96, 96),  # SD 2.1: (320, 640, 1280, 1280)
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 4, 8, 8), norm_num_groups=16, cross_attention_dim=48,
        use_linear_projection=True, upcast_attention=True,
    )
    vae = _vae(0.18215)
    _randomise(seed, unet, vae, text_encoder)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
