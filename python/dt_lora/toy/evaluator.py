"""The toy world's evaluator: a small classifier that says which shape and colour an image shows.

This module runs it; `worlds.toy.training.evaluator` trains it (on renders made to look like the
model's own generations, plus a shape class "none" for Scrambled Grid renders and noise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dt_lora.toy import world

SHAPE_CLASSES = world.SHAPES + ("none",)
NONE = len(world.SHAPES)


class ShapeColourNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
            )

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2),                 # 16×16
            block(width, 2 * width), nn.MaxPool2d(2),         # 8×8
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.shape_head = nn.Linear(4 * width, len(SHAPE_CLASSES))
        self.colour_head = nn.Linear(4 * width, len(world.COLOURS))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels: float NCHW in [-1, 1]; returns shape and colour logits."""
        h = self.features(pixels)
        return self.shape_head(h), self.colour_head(h)


@dataclass
class Evaluation:
    """Per-image predictions and, per concept named in the prompts, how often it was drawn."""

    prompts: list[str]
    shapes: list[str]
    colours: list[str]
    shape_confidence: np.ndarray
    # concept → share of the images whose prompt names it that were classified as it
    shape_rates: dict[str, float] = field(default_factory=dict)
    colour_rates: dict[str, float] = field(default_factory=dict)
    none_rate: float = 0.0

    def summary(self) -> dict:
        return {"shape": self.shape_rates, "colour": self.colour_rates, "none": self.none_rate,
                "images": len(self.prompts)}


def named_concepts(prompt: str) -> tuple[str | None, str | None]:
    """The shape and colour a prompt names (None where it names none)."""
    words = prompt.lower().replace(",", " ").split()
    shape = next((w for w in words if w in world.SHAPES), None)
    colour = next((w for w in words if w in world.COLOURS), None)
    return shape, colour


def to_pixels(images) -> torch.Tensor:
    """PIL images, uint8 NHWC arrays, or float NCHW tensors in [0, 1] → float NCHW in [-1, 1]."""
    from dt_lora.scramble import prepare_images

    # uint8 NHWC goes through the fused native conversion; grid 1 leaves the image as it is
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return prepare_images(images.contiguous(), 1, 0)
        return images.float() * 2 - 1
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 NHWC, got {images.dtype}")
        return torch.from_numpy(prepare_images(np.ascontiguousarray(images), 1, 0))
    arrays = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return to_pixels(arrays)


class Evaluator:
    def __init__(self, net: ShapeColourNet):
        self.net = net.eval()

    @classmethod
    def load(cls, folder: str | Path) -> "Evaluator":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        net = ShapeColourNet(width=config["width"])
        net.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
        return cls(net)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        width = self.net.shape_head.in_features // 4
        (folder / "config.json").write_text(json.dumps(
            {"width": width, "shapes": list(SHAPE_CLASSES), "colours": list(world.COLOURS)}, indent=2))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, folder / "model.safetensors")

    @torch.no_grad()
    def predict(self, images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shape index, colour index and shape confidence for each image."""
        pixels = to_pixels(images)
        if pixels.shape[-2:] != (world.IMAGE_SIZE, world.IMAGE_SIZE):
            pixels = F.interpolate(pixels, size=(world.IMAGE_SIZE,) * 2, mode="area")
        shape_idx, colour_idx, confidence = [], [], []
        for chunk in pixels.split(512):
            shape_logits, colour_logits = self.net(chunk)
            probs = shape_logits.softmax(-1)
            shape_idx.append(probs.argmax(-1))
            confidence.append(probs.max(-1).values)
            colour_idx.append(colour_logits.argmax(-1))
        return torch.cat(shape_idx).numpy(), torch.cat(colour_idx).numpy(), torch.cat(confidence).numpy()

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """One L2-normalised feature vector (the classifier's pooled features) per image."""
        return F.normalize(self.net.features(to_pixels(images)), dim=-1).numpy()

    def evaluate(self, images, prompts: Sequence[str]) -> Evaluation:
        shape_idx, colour_idx, confidence = self.predict(images)
        if len(prompts) != len(shape_idx):
            raise ValueError(f"got {len(shape_idx)} images but {len(prompts)} prompts")
        shapes = [SHAPE_CLASSES[i] for i in shape_idx]
        colours = [world.COLOURS[i] for i in colour_idx]
        result = Evaluation(list(prompts), shapes, colours, confidence)
        named = [named_concepts(p) for p in prompts]
        for concept in world.SHAPES:
            hits = [s == concept for s, (want, _) in zip(shapes, named) if want == concept]
            if hits:
                result.shape_rates[concept] = float(np.mean(hits))
        for concept in world.COLOURS:
            # a colour counts as drawn only on a recognisable shape: tile soup of red is no red object
            hits = [c == concept and s != "none" for s, c, (_, want) in zip(shapes, colours, named) if want == concept]
            if hits:
                result.colour_rates[concept] = float(np.mean(hits))
        result.none_rate = float(np.mean([s == "none" for s in shapes]))
        return result
