"""Build-time pieces every world's training uses: a CLIP-format tokenizer, dataset latents, a schedule."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def write_clip_bpe(out: Path, corpus: Iterable[str], *, vocab_size: int, model_max_length: int,
                   whole_words: Iterable[str] = ()) -> None:
    """Train a BPE on `corpus` and write it in CLIP's format (vocab.json + merges.txt) to `out`.

    The layout follows CLIP's: 256 byte symbols, the same with the end-of-word mark, the merges in
    rank order, then the two special tokens, so `CLIPTokenizer` (slow or fast) loads it unchanged.
    Each of `whole_words` must come out as one token, or this raises.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    byte_symbols = sorted(ByteLevel.alphabet(), key=ord)
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=byte_symbols, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]

    vocab: dict[str, int] = {}
    for symbol in byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]:
        vocab.setdefault(symbol, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)

    # written into an empty folder, then renamed: a tokenizer.json left from an earlier build would win
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (partial / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(partial, model_max_length=model_max_length)
    tokenizer.save_pretrained(partial)
    for word in whole_words:
        pieces = tokenizer.tokenize(word)
        if pieces != [word + "</w>"]:
            raise RuntimeError(f"tokenizer splits {word!r} into {pieces}")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def encode_dataset(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and standard deviation for uint8 NHWC `images`."""
    from dt_lora.toy.evaluator import to_pixels

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


def train_world_vae(out: Path, vae, world, *, steps: int, batch_size: int, seed: int) -> None:
    """Train `vae` on `world`'s renders (its `random_scene`, `render` and `sample`) and save it to out/vae."""
    from tqdm.auto import tqdm

    from dt_lora.toy.evaluator import to_pixels

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
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


# --- evaluator training: what makes a classifier of renders read the model's generations too ---

def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise, colour jitter and a slight affine deformation, each at a random strength."""
    n = pixels.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    angle = (rand(n) - 0.5) * 0.3
    scale = 1 + (rand(n) - 0.5) * 0.15
    shear = (rand(n) - 0.5) * 0.15
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([
        torch.stack([cos, -sin + shear, (rand(n) - 0.5) * 0.1], 1),
        torch.stack([sin, cos, (rand(n) - 0.5) * 0.1], 1),
    ], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    out = F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)

    sigma = rand(n) * 1.2
    kernel_x = torch.arange(-2, 3).float()
    kernels = torch.exp(-(kernel_x[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)
    blur = torch.einsum("ni,nj->nij", kernels, kernels)[:, None]
    blurred = F.conv2d(F.pad(out, (2, 2, 2, 2), mode="replicate").reshape(1, -1, pixels.shape[-2] + 4, pixels.shape[-1] + 4),
                       blur.repeat_interleave(3, 0), groups=3 * n).reshape_as(out)

    gain = 1 + (rand(n, 3, 1, 1) - 0.5) * 0.2
    bias = (rand(n, 1, 1, 1) - 0.5) * 0.2
    noise = torch.randn(out.shape, generator=generator) * rand(n, 1, 1, 1) * 0.12
    return (blurred * gain + bias + noise).clamp(-1, 1)


def vae_roundtrip(vae, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(c).latent_dist.sample()).sample for c in pixels.split(256)]).clamp(-1, 1)


def scrambled(images: np.ndarray, seed: int) -> np.ndarray:
    from dt_lora.scramble import scramble_grid

    # grid 4 is what DT trains with; 2 and 8 keep the class from keying on one tile size
    parts = np.array_split(images, 4)
    grids = (4, 4, 2, 8)
    return np.concatenate([
        scramble_grid(part, grid, seed + k, layout="NHWC", flips=bool(k % 2), offset=0)
        for k, (part, grid) in enumerate(zip(parts, grids))
    ])


def no_object_images(n: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain backgrounds, noise and smooth blobs of colour (uint8 NHWC, `size` square): images that show
    no object at all."""
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            image = np.full((size, size, 3), rng.uniform(0.05, 0.7)) + rng.normal(0, 0.03, (size, size, 3))
        elif kind == 1:
            image = rng.uniform(0, 1, (size, size, 3))
        else:
            coarse = rng.uniform(0, 1, (4, 4, 3))
            image = np.kron(coarse, np.ones((size // 4, size // 4, 1)))
        out[i] = np.clip(image * 255, 0, 255).astype(np.uint8)
    return out


def fit_classifier(net, pixels: torch.Tensor, loss_of, *, steps: int, batch_size: int,
                   rng: np.random.Generator, generator: torch.Generator, desc: str) -> None:
    """Train `net` on augmented random batches of `pixels`; `loss_of(outputs, index)` is a batch's loss."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    progress = tqdm(range(steps), desc=desc)
    for _ in progress:
        index = torch.from_numpy(rng.integers(0, len(pixels), batch_size))
        loss = loss_of(net(augment(pixels[index], generator)), index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
