"""What the canvas VAE keeps: reconstruction error, and what the evaluator still reads after a round trip.

    python -m research.canvas_vae --vae DIR/vae [--vae OTHER/vae] [--evaluator DIR/evaluator]

The model can draw at most what its VAE decodes, so a style or a mark the round trip loses is lost to
every character that has it. Renders are drawn with seeds from 4,000,000 (never used by the build), half
of them characters. Prints, per VAE, the mean absolute pixel error (out of 255) and, with an evaluator,
the share of images whose object, colour, style and mark it reads right, on the renders themselves
and on each VAE's round trips.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dt_lora.canvas import world
from dt_lora.canvas.quality import attribute_accuracy
from dt_lora.toy.evaluator import to_pixels

SEED = 4_000_000


def round_trip(vae, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        pixels = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample.clamp(-1, 1)
                            for c in to_pixels(images).split(64)])
    return ((pixels + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main(argv: list[str] | None = None) -> None:
    from diffusers import AutoencoderKL

    from dt_lora.canvas.evaluator import Evaluator

    parser = argparse.ArgumentParser(prog="python -m research.canvas_vae", description=__doc__)
    parser.add_argument("--vae", action="append", required=True, help="a VAE folder; repeat to compare")
    parser.add_argument("--evaluator", default=None, help="an evaluator folder, to read the round trips")
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args(argv)

    images, scenes = world.sample(args.images, SEED, character_rate=0.5)
    looks = [s.look for s in scenes]
    evaluator = Evaluator.load(args.evaluator) if args.evaluator else None
    if evaluator is not None:
        print("renders:", attribute_accuracy(evaluator.read(images), looks))
    for folder in args.vae:
        vae = AutoencoderKL.from_pretrained(folder).eval()
        decoded = round_trip(vae, images)
        error = float(np.abs(decoded.astype(int) - images).mean())
        print(f"{folder}: {vae.config.latent_channels} latent channels, mean abs error {error:.2f} / 255")
        if evaluator is not None:
            print("  round trips:", attribute_accuracy(evaluator.read(decoded), looks))


if __name__ == "__main__":
    main()
