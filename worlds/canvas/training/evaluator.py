"""Training the canvas world's evaluator (the `evaluator` stage of `python -m worlds.canvas.build`).

As the toy's: renders made to look like generations (blur, noise, colour jitter, slight deformation,
the VAE's encode→decode), plus the object class "none" for Scrambled Grid renders, noise and blobs.
Tile soup keeps its colour label (the colours are still there) but has no style and no mark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dt_lora.canvas import world
from dt_lora.canvas.evaluator import HEADS, NONE, Evaluator, LookNet
from dt_lora.toy.evaluator import to_pixels
from worlds.training import fit_classifier, no_object_images, scrambled, vae_roundtrip

IGNORE = -100  # the label of a head that an image has no answer for


def _labels(scenes: list[world.Scene]) -> dict[str, np.ndarray]:
    return {name: np.array([HEADS[name].index(getattr(s.look, name)) for s in scenes]) for name in HEADS}


def _sample(n: int, seed: int) -> tuple[np.ndarray, list[world.Scene]]:
    """Renders with more marks and characters than the denoiser's data: the evaluator must read them all."""
    rng = np.random.default_rng(seed)
    everyone = world.characters()
    scenes = [world.random_scene(rng, everyone[rng.integers(len(everyone))].look if rng.random() < 0.3
                                 else world.random_look(rng, mark_rate=0.6)) for _ in range(n)]
    return np.stack([world.render(s, rng) for s in scenes]), scenes


def training_set(vae, seed: int, *, clean: int = 24_000, roundtrip: int = 8000, scrambled_count: int = 6000,
                 blank: int = 2000) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixels in [-1, 1] and, per head, their labels (IGNORE where the image has none)."""
    rng = np.random.default_rng(seed)
    images, scenes = _sample(clean, seed + 1)
    labels = _labels(scenes)
    clean_px = to_pixels(images)
    roundtrip_px = vae_roundtrip(vae, clean_px[:roundtrip])

    soup_images, soup_scenes = _sample(scrambled_count, seed + 2)
    soup_px = to_pixels(scrambled(soup_images, seed + 3))
    soup_px = torch.cat([soup_px[: scrambled_count // 2], vae_roundtrip(vae, soup_px[scrambled_count // 2:])])
    blank_px = to_pixels(no_object_images(blank, rng, world.IMAGE_SIZE))

    none = np.full(scrambled_count + blank, HEADS["object"].index(NONE))
    ignored = np.full(scrambled_count + blank, IGNORE)
    targets = {
        "object": np.concatenate([labels["object"], labels["object"][:roundtrip], none]),
        "colour": np.concatenate([labels["colour"], labels["colour"][:roundtrip], _labels(soup_scenes)["colour"],
                                  np.full(blank, IGNORE)]),
        "style": np.concatenate([labels["style"], labels["style"][:roundtrip], ignored]),
        "mark": np.concatenate([labels["mark"], labels["mark"][:roundtrip], ignored]),
    }
    pixels = torch.cat([clean_px, roundtrip_px, soup_px, blank_px])
    return pixels, {name: torch.from_numpy(t) for name, t in targets.items()}


def train_evaluator(out: Path, *, steps: int, seed: int, batch_size: int = 128) -> Evaluator:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae", dtype=torch.float32).eval()
    pixels, targets = training_set(vae, seed)

    def loss_of(logits, index):
        return sum(F.cross_entropy(logits[name], targets[name][index], ignore_index=IGNORE) for name in HEADS)

    net = LookNet()
    fit_classifier(net, pixels, loss_of, steps=steps, batch_size=batch_size, rng=rng, generator=generator,
                   desc="canvas evaluator")

    evaluator = Evaluator(net)
    evaluator.save(out / "evaluator")
    return evaluator
