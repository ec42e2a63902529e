"""The toy world: a tiny, real Stable Diffusion pipeline of coloured shapes and the evaluator that scores it.

    pipe = dt_lora.toy.load()                       # a diffusers StableDiffusionPipeline
    images = pipe(["a red circle"] * 8, num_inference_steps=25, guidance_scale=5.0).images
    dt_lora.toy.evaluate(images, ["a red circle"] * 8).shape_rates   # {'circle': 1.0}
    controlnet = dt_lora.toy.load_controlnet()      # a diffusers ControlNetModel on location maps (controlnet.py)

Run time is this module (loaders), `world` (renders and prompts), `evaluator` (the classifier),
`controlnet` (generating under control) and `quality` (every measurement). The model folder ships
inside the package (`MODEL_DIR`) and was made by `python -m dt_lora.toy.build` (`build.py`, with the
training code in `training/`; nothing at run time imports either).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

from .world import COLOURS, HELDOUT_TEMPLATES, SHAPES, TRAIN_TEMPLATES, prompt_for

MODEL_DIR = Path(__file__).parent / "model"
SDXL_MODEL_DIR = Path(__file__).parent / "model_sdxl"  # the toy SDXL (`--base toy-sdxl`), same world and evaluator

# The sampler the toy world's quality numbers are measured with.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0
# The first seed of every measurement (`quality`, `dt-lora eval`): far from every seed that the build and
# shield training use, so measurements always draw from seeds never seen in training.
EVAL_SEED = 1_000_000


def load(device: str = "cpu", dtype=None, model_dir: str | Path | None = None):
    """The toy StableDiffusionPipeline (or, from SDXL_MODEL_DIR, the toy StableDiffusionXLPipeline),
    loaded offline through the ordinary diffusers path."""
    import json

    import torch

    from ..base import pipeline_class_for

    folder = Path(model_dir) if model_dir is not None else MODEL_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"toy model not found at {folder}: reinstall dt-lora or rebuild it with "
            f"`python -m dt_lora.toy.build --out {folder}`"
        )
    class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    pipeline_class = pipeline_class_for(class_name, f"toy model folder {folder}")
    # shipped in float16 to stay small; computed in float32 on CPU, where float16 is slow
    pipeline = pipeline_class.from_pretrained(folder, dtype=dtype or torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


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
            f"`python -m dt_lora.toy.build --out {folder.parent} --stages controlnet`"
        )
    controlnet = ControlNetModel.from_pretrained(folder, dtype=dtype or torch.float32)
    return controlnet.to(device).eval()


@lru_cache(maxsize=2)
def load_evaluator(folder: str | Path | None = None):
    from .evaluator import Evaluator

    return Evaluator.load(Path(folder) if folder is not None else MODEL_DIR / "evaluator")


def evaluate(images, prompts: Sequence[str]):
    """Classify generated images and report, per concept named in `prompts`, how often it was drawn."""
    return load_evaluator().evaluate(images, prompts)


__all__ = [
    "COLOURS", "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "EVAL_SEED", "HELDOUT_TEMPLATES", "MODEL_DIR", "SDXL_MODEL_DIR",
    "SHAPES",
    "TRAIN_TEMPLATES", "evaluate", "load", "load_controlnet", "load_evaluator", "prompt_for",
]
