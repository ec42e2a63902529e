"""Training the toy world's evaluator (the `evaluator` stage of `python -m worlds.toy.build`).

It is trained on renders made to look like the model's own generations (blur, noise, colour jitter,
slight deformation, and the toy VAE's encode→decode), plus a shape class "none" for Scrambled Grid
renders and noise: what a shielded prompt should produce. Trained on crisp renders alone it scored
well under 50% on clearly drawn generated shapes, so the augmentations are not optional.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dt_lora.toy import world
from dt_lora.toy.evaluator import NONE, Evaluator, ShapeColourNet, to_pixels

IGNORE = -100  # colour label of images that have none (noise)


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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
    blurred = F.conv2d(F.pad(out, (2, 2, 2, 2), mode="replicate").reshape(1, -1, 36, 36),
                       blur.repeat_interleave(3, 0), groups=3 * n).reshape_as(out)

    gain = 1 + (rand(n, 3, 1, 1) - 0.5) * 0.2
    bias = (rand(n, 1, 1, 1) - 0.5) * 0.2
    noise = torch.randn(out.shape, generator=generator) * rand(n, 1, 1, 1) * 0.12
    return (blurred * gain + bias + noise).clamp(-1, 1)


def _vae_roundtrip(vae, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(c).latent_dist.sample()).sample for c in pixels.split(256)]).clamp(-1, 1)


def _scrambled(images: np.ndarray, seed: int) -> np.ndarray:
    from dt_lora.scramble import scramble_grid

    # grid 4 is what DT trains with; 2 and 8 keep the class from keying on one tile size
    parts = np.array_split(images, 4)
    grids = (4, 4, 2, 8)
    return np.concatenate([
        scramble_grid(part, grid, seed + k, layout="NHWC", flips=bool(k % 2), offset=0)
        for k, (part, grid) in enumerate(zip(parts, grids))
    ])


def _no_shape_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Plain backgrounds, noise and smooth blobs of colour: images that show no shape at all."""
    out = np.empty((n, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            image = np.full((world.IMAGE_SIZE, world.IMAGE_SIZE, 3), rng.uniform(0.05, 0.7)) + rng.normal(0, 0.03, (world.IMAGE_SIZE, world.IMAGE_SIZE, 3))
        elif kind == 1:
            image = rng.uniform(0, 1, (world.IMAGE_SIZE, world.IMAGE_SIZE, 3))
        else:
            coarse = rng.uniform(0, 1, (4, 4, 3))
            image = np.kron(coarse, np.ones((8, 8, 1)))
        out[i] = np.clip(image * 255, 0, 255).astype(np.uint8)
    return out


def train_evaluator(out: Path, *, steps: int, seed: int, batch_size: int = 128) -> Evaluator:
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae", dtype=torch.float32).eval()

    clean, scenes = world.sample(16_000, seed + 1)
    shape_of = np.array([world.SHAPES.index(s.shape) for s in scenes])
    colour_of = np.array([world.COLOURS.index(s.colour) for s in scenes])
    clean_px = to_pixels(clean)
    roundtrip_px = _vae_roundtrip(vae, clean_px[:6000])

    scrambled_src, scrambled_scenes = world.sample(6000, seed + 2)
    scrambled_px = to_pixels(_scrambled(scrambled_src, seed + 3))
    scrambled_px = torch.cat([scrambled_px[:3000], _vae_roundtrip(vae, scrambled_px[3000:])])
    scrambled_colour = np.array([world.COLOURS.index(s.colour) for s in scrambled_scenes])
    blank_px = to_pixels(_no_shape_images(2000, rng))

    pixels = torch.cat([clean_px, roundtrip_px, scrambled_px, blank_px])
    shape_y = torch.from_numpy(np.concatenate([shape_of, shape_of[:6000], np.full(8000, NONE)]))
    colour_y = torch.from_numpy(np.concatenate([colour_of, colour_of[:6000], scrambled_colour, np.full(2000, IGNORE)]))

    net = ShapeColourNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    progress = tqdm(range(steps), desc="evaluator")
    for _ in progress:
        index = torch.from_numpy(rng.integers(0, len(pixels), batch_size))
        shape_logits, colour_logits = net(_augment(pixels[index], generator))
        loss = F.cross_entropy(shape_logits, shape_y[index]) + F.cross_entropy(
            colour_logits, colour_y[index], ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")

    evaluator = Evaluator(net)
    evaluator.save(out / "evaluator")
    return evaluator
