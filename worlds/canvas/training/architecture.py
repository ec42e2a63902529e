"""The canvas model's components: SD 1.x's classes and module names, at a size two CPU cores train in stages.

Wider than the toy where the world needs it: the text encoder is 128 wide, so that a hundred
characters' shields cannot each have a direction of their own (100 shields' key/value directions
against 128 dimensions), and the images are 48×48, so that a style's pattern and a mark have pixels
to be drawn in.
"""

from __future__ import annotations

from worlds.toy.training import architecture as toy_architecture
from worlds.toy.training.architecture import SCHEDULER_CONFIG, text_encoder_config  # noqa: F401  SD 1.x's

TOKENIZER_MAX_LENGTH = 32
TEXT_HIDDEN_SIZE = 128
TEXT_LAYERS = 4
LATENT_CHANNELS = 8
VOCAB_SIZE = 32_000  # BPE merges over ordinary English: the 30,000 most frequent words stay whole


def canvas_text_encoder_config(vocab_size: int, bos_token_id: int, eos_token_id: int):
    config = text_encoder_config(vocab_size, bos_token_id, eos_token_id, hidden_size=TEXT_HIDDEN_SIZE)
    config.num_hidden_layers = TEXT_LAYERS
    config.max_position_embeddings = TOKENIZER_MAX_LENGTH
    return config


def make_vae():
    # 48×48×3 pixels → 12×12×8 latents: the toy's VAE at this size. Eight channels, not SD's four: a VAE
    # this small, trained with pixel losses alone, blurs the styles' 6-pixel patterns and the marks away
    # through four, and what the VAE cannot decode the model cannot draw (research/canvas-world.md).
    return toy_architecture.make_vae(sample_size=48, latent_channels=LATENT_CHANNELS)


def make_unet():
    from diffusers import UNet2DConditionModel

    # No attention at 12×12, as SDXL has none at its first level: self-attention over 144 positions
    # would double the cost of a step, and the prompt still reaches every level through the 6×6 and 3×3 ones.
    return UNet2DConditionModel(
        sample_size=12,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(48, 96, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=16,
    )
