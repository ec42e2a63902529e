"""The toy model's components: the classes and module names of SD 1.x, at a size a CPU trains in minutes.

Only the sizes differ from Stable Diffusion 1.x: the same `CLIPTokenizer`/`CLIPTextModel`,
`AutoencoderKL`, `UNet2DConditionModel` with cross-attention blocks (so LoRA targets carry SD's names:
`attn1`/`attn2` × `to_q`/`to_k`/`to_v`/`to_out.0`) and SD's noise schedule.
"""

from __future__ import annotations

TOKENIZER_MAX_LENGTH = 16
TEXT_HIDDEN_SIZE = 64

# SD 1.x's schedule: what a DT recipe for a real model will run against, so the toy runs it too.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def text_encoder_config(vocab_size: int, bos_token_id: int, eos_token_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def make_vae():
    from diffusers import AutoencoderKL

    # 32×32×3 pixels → 8×8×4 latents: three blocks, two downsamples (vae_scale_factor 4).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=16,
    )
