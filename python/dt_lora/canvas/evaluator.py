"""The canvas world's evaluator: a classifier that reads an image's object, colour, style and mark.

A character is its look, so the evaluator names the character an image shows by looking up the four
attributes it reads (`world.identity`): a near neighbour drawn in place of a character is named as
the neighbour, not as the character. The object class "none" is what a shielded prompt should
produce (Scrambled Grid tile soup, noise). `worlds.canvas.training.evaluator` trains it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dt_lora.canvas import world
from dt_lora.toy.evaluator import to_pixels

NONE = "none"
HEADS = {
    "object": world.OBJECTS + (NONE,),
    "colour": world.COLOURS,
    "style": (world.PLAIN,) + world.STYLES,
    "mark": (world.NO_MARK,) + world.MARKS,
}


class LookNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
            )

        self.width = width
        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2),                   # 24×24
            block(width, 2 * width), nn.MaxPool2d(2),           # 12×12
            block(2 * width, 4 * width), nn.MaxPool2d(2),       # 6×6
            block(4 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width, len(classes)) for name, classes in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels: float NCHW in [-1, 1]; returns each head's logits."""
        h = self.features(pixels)
        return {name: head(h) for name, head in self.heads.items()}


@dataclass(frozen=True)
class Reading:
    """What the evaluator reads in one image: a look (None when it shows no object) and who that is."""

    look: world.Look | None
    character: str  # a character's name, or world.NO_CHARACTER
    confidence: float  # of the object

    @property
    def object(self) -> str:
        return self.look.object if self.look is not None else NONE


class Evaluator:
    def __init__(self, net: LookNet):
        self.net = net.eval()

    @classmethod
    def load(cls, folder: str | Path) -> Evaluator:
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        net = LookNet(width=config["width"])
        net.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
        return cls(net)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"width": self.net.width, **{name: list(classes) for name, classes in HEADS.items()}}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, folder / "model.safetensors")

    @torch.no_grad()
    def predict(self, images) -> dict[str, np.ndarray]:
        """Per head, each image's class index; "confidence" the object head's top probability."""
        pixels = to_pixels(images)
        if pixels.shape[-2:] != (world.IMAGE_SIZE, world.IMAGE_SIZE):
            pixels = F.interpolate(pixels, size=(world.IMAGE_SIZE,) * 2, mode="area")
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in (*HEADS, "confidence")}
        for chunk in pixels.split(512):
            logits = self.net(chunk)
            for name in HEADS:
                outputs[name].append(logits[name].argmax(-1))
            outputs["confidence"].append(logits["object"].softmax(-1).max(-1).values)
        return {name: torch.cat(values).numpy() for name, values in outputs.items()}

    def read(self, images) -> list[Reading]:
        """What each image shows."""
        predicted = self.predict(images)
        readings = []
        for i in range(len(predicted["object"])):
            object_ = HEADS["object"][predicted["object"][i]]
            if object_ == NONE:
                readings.append(Reading(None, world.NO_CHARACTER, float(predicted["confidence"][i])))
                continue
            look = world.Look(object_, *(HEADS[name][predicted[name][i]] for name in ("colour", "style", "mark")))
            readings.append(Reading(look, world.identity(look), float(predicted["confidence"][i])))
        return readings

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """One L2-normalised feature vector (the classifier's pooled features) per image."""
        return F.normalize(self.net.features(to_pixels(images)), dim=-1).numpy()
