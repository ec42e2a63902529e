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


def text_encoder_config(vocab_size: int, bos_token_id: int, eos_token_id: int, hidden_size: int = TEXT_HIDDEN_SIZE):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def make_vae(sample_size: int = 32, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    # 32×32×3 pixels → 8×8×4 latents: three blocks, two downsamples (vae_scale_factor 4).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=sample_size,
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


# --- the toy SDXL: SDXL's block types and conditioning at the toy's size -----------------------------
# Two text encoders whose penultimate hidden states are concatenated (CLIP-L-like, and an OpenCLIP-G-like
# one with a projection for the pooled embedding), a UNet whose first level has no attention, linear
# transformer projections, and the "text_time" added embedding of the pooled prompt and six size ids.
# Two layers a block, as SDXL has (kohya's SGM names count on it). The second encoder is wider than the
# first, as OpenCLIP-G (1280) is wider than CLIP-L (768): diffusers' `from_single_file` tells the two
# towers of an SDXL checkpoint apart by width, so equal widths would load the first into both.
SDXL_TIME_EMBED = 16
SDXL_POOLED = 64
SDXL_TEXT_2_HIDDEN_SIZE = 96


def sdxl_text_encoder_configs(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id_2: int):
    """(CLIP-L-like config, OpenCLIP-G-like config): the first pads with its end token, the second with "!"."""
    first = text_encoder_config(vocab_size, bos_token_id, eos_token_id)
    second = text_encoder_config(vocab_size, bos_token_id, eos_token_id, hidden_size=SDXL_TEXT_2_HIDDEN_SIZE)
    second.hidden_act, second.projection_dim, second.pad_token_id = "gelu", SDXL_POOLED, pad_token_id_2
    return first, second


def make_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(48, 96, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN_SIZE + SDXL_TEXT_2_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_POOLED,
    )
