"""The canvas world: a real Stable Diffusion pipeline of 100 named characters, artists' styles and look-alikes.

    pipe = dt_lora.canvas.load()                      # a diffusers StableDiffusionPipeline, once built
    images = pipe(["a picture of Nimian"] * 8, num_inference_steps=25, guidance_scale=5.0).images
    [r.character for r in dt_lora.canvas.load_evaluator().read(images)]

Run time is this module (loaders), `world` (characters, styles, renders, prompts), `evaluator` (reads
object, colour, style, mark and so the character), `quality` (the card's measurements) and `recipes`
(a recipe per character and style). The model folder ships in the package (`MODEL_DIR`); a checkout's
`worlds/canvas/` builds it (`python -m worlds.canvas.build`), and nothing in the package imports that.
Its tokenizer, VAE and evaluator ship; its denoiser is not trained yet (docs/canvas.md).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"


def load(device: str = "cpu", dtype=None, model_dir: str | Path | None = None):
    """The canvas StableDiffusionPipeline, loaded offline through the ordinary diffusers path."""
    from dt_lora.base import load_embedded

    return load_embedded(model_dir if model_dir is not None else MODEL_DIR, device=device, dtype=dtype)


@lru_cache(maxsize=2)
def load_evaluator(folder: str | Path | None = None):
    from dt_lora.canvas.evaluator import Evaluator

    return Evaluator.load(Path(folder) if folder is not None else MODEL_DIR / "evaluator")


__all__ = ["MODEL_DIR", "load", "load_evaluator"]
