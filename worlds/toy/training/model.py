"""Build-time training of the toy pipeline itself: tokenizer, VAE, denoiser (text encoder + UNet).

`encode_dataset`, `training_batch` and `warmup_cosine` are shared with the ControlNet's training
(`controlnet.py`), which trains on the same latents and prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dt_lora.toy import world
from dt_lora.toy.evaluator import to_pixels
from worlds.toy.training import architecture

EXTRA_WORDS = "the with and on in background grey gray dark light big small one shape of".split()


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
    """A CLIP-format BPE (vocab.json + merges.txt) whose merges make each toy word one token.

    The layout follows CLIP's: 256 byte symbols, the same with the end-of-word mark, the merges in
    rank order, then the two special tokens, so `CLIPTokenizer` (slow or fast) loads it unchanged.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    byte_symbols = sorted(ByteLevel.alphabet(), key=ord)
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, initial_alphabet=byte_symbols, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator([" ".join(_words())], trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]

    vocab: dict[str, int] = {}
    for symbol in byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]:
        vocab.setdefault(symbol, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(out, model_max_length=architecture.TOKENIZER_MAX_LENGTH)
    tokenizer.save_pretrained(out)
    for word in _words():
        pieces = tokenizer.tokenize(word)
        if pieces != [word + "</w>"]:
            raise RuntimeError(f"tokenizer splits toy word {word!r} into {pieces}")


def train_vae(out: Path, *, steps: int, batch_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = architecture.make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    progress = tqdm(range(steps), desc="vae")
    for _ in progress:
        scenes = [world.random_scene(rng) for _ in range(batch_size)]
        x = to_pixels(np.stack([world.render(s, rng) for s in scenes]))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 keeps edges sharp; a tiny KL keeps the latent scale bounded without blurring.
        loss = F.l1_loss(recon, x) + 0.5 * F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")

    # SD convention: latents are multiplied by scaling_factor so that they have unit variance.
    with torch.no_grad():
        images, _ = world.sample(2048, seed + 1)
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in to_pixels(images).split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(out / "vae")


def encode_dataset(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    with torch.no_grad():
        for chunk in to_pixels(images).split(512):
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def warmup_cosine(optimizer, *, warmup: int, steps: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )


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
