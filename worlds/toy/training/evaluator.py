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
from worlds.training import fit_classifier, no_object_images, scrambled, vae_roundtrip

IGNORE = -100  # colour label of images that have none (noise)


def train_evaluator(out: Path, *, steps: int, seed: int, batch_size: int = 128) -> Evaluator:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae", dtype=torch.float32).eval()

    clean, scenes = world.sample(16_000, seed + 1)
    shape_of = np.array([world.SHAPES.index(s.shape) for s in scenes])
    colour_of = np.array([world.COLOURS.index(s.colour) for s in scenes])
    clean_px = to_pixels(clean)
    roundtrip_px = vae_roundtrip(vae, clean_px[:6000])

    scrambled_src, scrambled_scenes = world.sample(6000, seed + 2)
    scrambled_px = to_pixels(scrambled(scrambled_src, seed + 3))
    scrambled_px = torch.cat([scrambled_px[:3000], vae_roundtrip(vae, scrambled_px[3000:])])
    scrambled_colour = np.array([world.COLOURS.index(s.colour) for s in scrambled_scenes])
    blank_px = to_pixels(no_object_images(2000, rng, world.IMAGE_SIZE))

    pixels = torch.cat([clean_px, roundtrip_px, scrambled_px, blank_px])
    shape_y = torch.from_numpy(np.concatenate([shape_of, shape_of[:6000], np.full(8000, NONE)]))
    colour_y = torch.from_numpy(np.concatenate([colour_of, colour_of[:6000], scrambled_colour, np.full(2000, IGNORE)]))

    def loss_of(outputs, index):
        shape_logits, colour_logits = outputs
        return F.cross_entropy(shape_logits, shape_y[index]) + F.cross_entropy(
            colour_logits, colour_y[index], ignore_index=IGNORE)

    net = ShapeColourNet()
    fit_classifier(net, pixels, loss_of, steps=steps, batch_size=batch_size, rng=rng, generator=generator,
                   desc="evaluator")

    evaluator = Evaluator(net)
    evaluator.save(out / "evaluator")
    return evaluator
