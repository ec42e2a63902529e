"""Scorers: what `evaluate_shields` asks of an image. Does it show the shielded concept, is an anchor
drawn correctly, and a feature vector for image distances.

  ToyScorer   the toy world's evaluator, through `dt_lora.toy.quality` (the measurements the toy
              world's tests and model card use too)
  CanvasScorer the canvas world's evaluator: a character is drawn when the image reads as that
              character, a style when the object is drawn in it, a description when every attribute is
              right
  ClipScorer  CLIP zero-shot from a local folder: an image shows the target when the target's label
              beats every anchor prompt; an anchor image is correct when its own prompt wins
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from dt_lora.base import CANVAS
from dt_lora.recipe import Recipe


class Scorer(Protocol):
    name: str

    def shows_target(self, images: np.ndarray, recipe: Recipe) -> np.ndarray:
        """Per image: does it show the recipe's target concept?"""

    def preservation(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
        """Per concept named in the prompts: the share of its images drawn correctly."""

    def features(self, images: np.ndarray) -> np.ndarray:
        """One L2-normalised feature vector per image."""


class ToyScorer:
    """The toy world's evaluator."""

    name = "toy evaluator"

    def __init__(self):
        from dt_lora import toy

        self.evaluator = toy.load_evaluator()

    @staticmethod
    def concept(recipe: Recipe) -> str:
        """The toy shape or colour every one of the recipe's target prompts names."""
        from dt_lora.toy.quality import target_concept

        concept = target_concept(recipe.target_prompts)
        if concept is None:
            raise ValueError(f"recipe {recipe.name!r}: its target prompts do not all name one toy shape or colour, "
                             "so the toy evaluator cannot score it; pass --clip with a CLIP model instead")
        return concept

    def shows_target(self, images, recipe):
        from dt_lora.toy.quality import shows_concept

        return shows_concept(self.evaluator, images, self.concept(recipe))

    def preservation(self, images, prompts):
        from dt_lora.toy.quality import drawn_rates

        return drawn_rates(self.evaluator, images, prompts)

    def features(self, images):
        return self.evaluator.features(images)


class CanvasScorer:
    """The canvas world's evaluator (`dt_lora.canvas.evaluator`)."""

    name = "canvas evaluator"

    def __init__(self):
        from dt_lora import canvas

        self.evaluator = canvas.load_evaluator()

    @staticmethod
    def concept(recipe: Recipe) -> tuple[str, str]:
        """("character", name) or ("style", style): what every one of the recipe's target prompts names."""
        from dt_lora.canvas import world

        characters = {world.named_in(p)[0] for p in recipe.target_prompts}
        styles = {world.named_style(p) for p in recipe.target_prompts}
        if len(characters) == 1 and None not in characters:
            return "character", characters.pop()
        if characters == {None} and len(styles) == 1 and world.PLAIN not in styles:
            return "style", styles.pop()
        raise ValueError(f"recipe {recipe.name!r}: its target prompts do not all name one canvas character or "
                         "one artist's style, so the canvas evaluator cannot score it")

    def shows_target(self, images, recipe):
        kind, value = self.concept(recipe)
        readings = self.evaluator.read(images)
        if kind == "character":
            return np.array([r.character == value for r in readings])
        return np.array([r.look is not None and r.look.style == value for r in readings])

    def preservation(self, images, prompts):
        """Per character named, the share of its images read as it; per look described, the share drawn
        with every attribute right."""
        from dt_lora.canvas import world

        hits: dict[str, list[bool]] = {}
        for reading, prompt in zip(self.evaluator.read(images), prompts):
            character, look = world.named_in(prompt)
            if character is not None:
                hits.setdefault(character, []).append(reading.character == character)
            elif look is not None:
                hits.setdefault(look.describe(), []).append(reading.look == look)
        return {concept: float(np.mean(values)) for concept, values in hits.items()}

    def features(self, images):
        return self.evaluator.features(images)


class ClipScorer:
    """CLIP zero-shot from a local model folder (transformers `CLIPModel`, safetensors weights)."""

    name = "CLIP zero-shot"

    def __init__(self, folder: str | Path, recipes: Sequence[Recipe]):
        from dt_lora.evaluate.metrics import load_clip

        self.model, self.processor = load_clip(folder)
        self.labels = [r.target_prompts[0] for r in recipes] + sorted({p for r in recipes for p in r.anchor_prompts})

    def _embed(self, images=None, texts=None):
        import torch

        with torch.no_grad():
            if texts is not None:
                inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
                out = self.model.get_text_features(**inputs)
            else:
                inputs = self.processor(images=list(images), return_tensors="pt")
                out = self.model.get_image_features(**inputs)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(out.float(), dim=-1).numpy()

    def _winners(self, images) -> list[str]:
        scores = self.features(images) @ self._embed(texts=self.labels).T
        return [self.labels[i] for i in scores.argmax(1)]

    def shows_target(self, images, recipe):
        return np.array([w == recipe.target_prompts[0] for w in self._winners(images)])

    def preservation(self, images, prompts):
        hits: dict[str, list[bool]] = {}
        for prompt, winner in zip(prompts, self._winners(images)):
            hits.setdefault(prompt, []).append(winner == prompt)
        return {p: float(np.mean(h)) for p, h in hits.items()}

    def features(self, images):
        return self._embed(images=images)


def choose_scorer(recipes: Sequence[Recipe], clip: str | Path | None = None) -> Scorer:
    """CLIP zero-shot from the local folder `clip`, or else the embedded world's evaluator (the canvas's
    for canvas recipes, the toy's otherwise), which must be able to score every recipe: a recipe it
    cannot score fails now, naming the recipe, before any model loads."""
    if clip is not None:
        return ClipScorer(clip, recipes)
    scorer = CanvasScorer() if recipes and all(r.base == CANVAS for r in recipes) else ToyScorer()
    for recipe in recipes:
        scorer.concept(recipe)
    return scorer
