"""The toy world: a tiny, real Stable Diffusion pipeline of coloured shapes and the evaluator that scores it.

    pipe = dt_lora.toy.load()                       # a diffusers StableDiffusionPipeline
    images = pipe(["a red circle"] * 8, num_inference_steps=25, guidance_scale=5.0).images
    dt_lora.toy.evaluate(images, ["a red circle"] * 8).shape_rates   # {'circle': 1.0}
    controlnet = dt_lora.toy.load_controlnet()      # a diffusers ControlNetModel on location maps (controlnet.py)

Run time is this module (loaders), `world` (renders and prompts), `evaluator` (the classifier),
`controlnet` (generating under control) and `quality` (every measurement). The model folders ship
inside the package (`MODEL_DIR`, `SDXL_MODEL_DIR`); a checkout's `worlds/toy/` built them
(`python -m worlds.toy.build`), and nothing in the package imports it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

from dt_lora.base import EMBEDDED_WORLDS, TOY, TOY_SDXL
from dt_lora.toy.world import COLOURS, HELDOUT_TEMPLATES, SHAPES, TRAIN_TEMPLATES, prompt_for

MODEL_DIR = EMBEDDED_WORLDS[TOY]
SDXL_MODEL_DIR = EMBEDDED_WORLDS[TOY_SDXL]  # the toy SDXL (`--base toy-sdxl`), same world and evaluator

# The sampler the toy world's quality numbers are measured with.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0
# The first seed of every measurement (`quality`, `dt-lora eval`): far from every seed that the build and
# shield training use, so measurements always draw from seeds never seen in training.
EVAL_SEED = 1_000_000


def load(device: str = "cpu", dtype=None, model_dir: str | Path | None = None):
    """The toy StableDiffusionPipeline (or, from SDXL_MODEL_DIR, the toy StableDiffusionXLPipeline),
    loaded offline through the ordinary diffusers path."""
    from dt_lora.base import load_embedded

    return load_embedded(model_dir if model_dir is not None else MODEL_DIR, device=device, dtype=dtype)


def load_controlnet(device: str = "cpu", dtype=None, model_dir: str | Path | None = None):
    """The toy ControlNet, conditioned on `world.location_map`s: where and how big, not what.

    It lives in the model folder's `controlnet/` but outside model_index.json, so `load()` is unchanged;
    `controlnet.generate_controlled` puts the two together.
    """
    import torch
    from diffusers import ControlNetModel

    folder = (Path(model_dir) if model_dir is not None else MODEL_DIR) / "controlnet"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"toy ControlNet not found at {folder}: rebuild it with "
            f"`python -m worlds.toy.build --out {folder.parent} --stages controlnet`"
        )
    controlnet = ControlNetModel.from_pretrained(folder, dtype=dtype or torch.float32)
    return controlnet.to(device).eval()


@lru_cache(maxsize=2)
def load_evaluator(folder: str | Path | None = None):
    from dt_lora.toy.evaluator import Evaluator

    return Evaluator.load(Path(folder) if folder is not None else MODEL_DIR / "evaluator")


def evaluate(images, prompts: Sequence[str]):
    """Classify generated images and report, per concept named in `prompts`, how often it was drawn."""
    return load_evaluator().evaluate(images, prompts)


__all__ = [
    "COLOURS", "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "EVAL_SEED", "HELDOUT_TEMPLATES", "MODEL_DIR", "SDXL_MODEL_DIR",
    "SHAPES",
    "TRAIN_TEMPLATES", "evaluate", "load", "load_controlnet", "load_evaluator", "prompt_for",
]
