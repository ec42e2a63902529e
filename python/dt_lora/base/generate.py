"""Sampling images from a pipeline, reproducibly: image i of a run always comes from seed + i."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

MAX_SEED = 2**63 - 1  # torch's generators take 64-bit seeds; image i uses seed + i


def image_names(seed: int, count: int) -> list[str]:
    """The files `count` images drawn from `seed` are saved as: each by its own seed, zero-padded, so a
    listing sorts in drawing order and a picture can be drawn again from its name alone."""
    if not 0 <= seed <= MAX_SEED - (count - 1):
        raise ValueError(f"seed {seed} with {count} images runs outside 0 to 2**63 - 1, the seeds torch takes")
    return [f"{seed + i:06d}.png" for i in range(count)]


def generate_images(
    pipeline,
    prompts: Sequence[str],
    *,
    seed: int,
    steps: int,
    guidance: float,
    batch_size: int = 64,
    negative_prompt: str | None = None,
    batch_inputs: Callable[[slice], dict] | None = None,
    progress: bool = False,
    across_processes: bool = False,
) -> np.ndarray:
    """Generate one image per prompt; returns uint8 NHWC.

    Each image gets its own generator seeded with `seed + index`, so an image does not depend on the
    batch size or on which other prompts share its batch. `batch_inputs(batch)` gives further pipeline
    arguments for the prompts `prompts[batch]` (a ControlNet's control images, say). With
    `across_processes`, under `accelerate launch` each process draws one contiguous share of the prompts
    and every process gets all the images (distributed.py).
    """
    import torch
    from tqdm.auto import tqdm

    from dt_lora import distributed

    if across_processes and len(prompts) and (n := distributed.processes()) > 1:
        bounds = [len(prompts) * k // n for k in range(n + 1)]

        def share(k: int) -> np.ndarray:
            start = bounds[k]
            return generate_images(
                pipeline, prompts[start:bounds[k + 1]], seed=seed + start, steps=steps, guidance=guidance,
                batch_size=batch_size, negative_prompt=negative_prompt, progress=progress and k == 0,
                batch_inputs=(lambda b: batch_inputs(slice(b.start + start, b.stop + start))) if batch_inputs else None)

        return np.concatenate([part for part in distributed.split_map(share, range(n)) if len(part)])

    chunks = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        batch = list(prompts[start:start + batch_size])
        generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(batch))]
        with torch.inference_mode():
            images = pipeline(
                batch,
                negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="np",
                **(batch_inputs(slice(start, start + len(batch))) if batch_inputs else {}),
            ).images
        _check_drawn(images, batch, seed + start)
        chunks.append(np.ascontiguousarray(np.clip(np.rint(images * 255), 0, 255), dtype=np.uint8))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 3), dtype=np.uint8)


def _check_drawn(images: np.ndarray, prompts: list[str], first_seed: int) -> None:
    """A NaN drawn would be written as a black image without a word (uint8 takes it as 0): refuse it."""
    from dt_lora.errors import NonFinite

    bad = [i for i, image in enumerate(images) if not np.isfinite(image).all()]
    if bad:
        raise NonFinite(f"the model drew NaN or inf values in {len(bad)} of {len(images)} image(s), e.g. "
                        f"{prompts[bad[0]]!r} at seed {first_seed + bad[0]}; its weights (or a stacked adapter's "
                        "weight) are too large, or its precision too low for them")


def image_grid(images: np.ndarray, columns: int, scale: int = 2) -> np.ndarray:
    """Tile uint8 NHWC images row by row into one uint8 HWC picture."""
    rows = -(-len(images) // columns)
    padded = np.concatenate([images, np.zeros((rows * columns - len(images),) + images.shape[1:], np.uint8)])
    h, w = images.shape[1:3]
    grid = padded.reshape(rows, columns, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, 3)
    return grid.repeat(scale, 0).repeat(scale, 1)
