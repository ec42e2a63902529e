"""The canvas model's card: its measured quality per group and attribute, and a picture of what it draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dt_lora.base.generate import image_grid
from dt_lora.canvas import load, world
from dt_lora.canvas.evaluator import Evaluator
from dt_lora.canvas.quality import DEFAULT_GUIDANCE, DEFAULT_STEPS, measure, read_renders


def write_card(out: Path, per_character: int = 8, per_pair: int = 4) -> dict:
    from PIL import Image

    evaluator = Evaluator.load(out / "evaluator")
    quality = measure(load(model_dir=out), evaluator, per_character=per_character, per_pair=per_pair)
    renders = read_renders(evaluator)
    rates = np.array(list(quality.characters.values()))
    groups = quality.group_rates()
    summary = {
        "evaluator on renders": renders,
        "characters": {"mean": float(rates.mean()), "min": float(rates.min()),
                       "at least 0.90": int((rates >= 0.90).sum()), "of": len(rates)},
        "groups": {str(g): r for g, r in groups.items()},
        "characters each": quality.characters,
        "descriptions": quality.attributes,
        "style on object, min": float(min(quality.style_on_object.values())),
        "sampler": {"scheduler": "DDIM", "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE},
    }
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    # the first character of each group, its neighbours beside it: one row per group
    first_images = quality.images[: len(quality.characters) * per_character : per_character]
    Image.fromarray(image_grid(first_images, world.GROUP_SIZE)).save(out / "samples.png")

    group_rows = "\n".join(
        f"| {g} | {', '.join(c.name for c in world.characters() if c.group == g)} | {r:.3f} |" for g, r in groups.items())
    styles = (world.PLAIN,) + world.STYLES
    style_rows = "\n".join(
        f"| {o} | " + " | ".join(f"{quality.style_on_object[o, s]:.2f}" for s in styles) + " |" for o in world.OBJECTS)
    (out / "README.md").write_text(f"""# dt-lora canvas model

A small Stable Diffusion 1.x–style pipeline (CLIPTextModel 128 wide over an English BPE vocabulary,
AutoencoderKL 48×48 → 12×12×8, UNet2DConditionModel with cross-attention, DDIM) trained on synthetic
renders of {len(world.OBJECTS)} objects, {len(world.COLOURS)} colours, {len(world.STYLES)} artists' styles
and {len(world.MARKS)} marks, and {len(rates)} named characters in {len(groups)} groups of near neighbours;
and the evaluator (`evaluator/`) that reads object (or "none"), colour, style and mark, and so the
character. Built by `python -m worlds.canvas.build --out DIR`.

## Measured quality

Seeds from 1,000,000 (never used in the build), DDIM {DEFAULT_STEPS} steps, guidance {DEFAULT_GUIDANCE}.

The evaluator on {2000} renders: {", ".join(f"{k} {v:.3f}" for k, v in renders.items())}.

**Characters**, {per_character} images each from its name alone (the character templates in turn):
mean {rates.mean():.3f}, lowest {rates.min():.3f}; {(rates >= 0.90).sum()} of {len(rates)} at 0.90 or more.

| group | characters | rate |
|---|---|---|
{group_rows}

**Descriptions**, {per_pair} images for every object in every style (colours and marks in turn):
{", ".join(f"{k} {v:.3f}" for k, v in quality.attributes.items())}. Share of each (object, style) drawn with
both right:

| object | {" | ".join(styles)} |
|---|{"---|" * len(styles)}
{style_rows}

## Samples

`samples.png`: one row per group, its four characters in order (the first, then the neighbours).

![samples](samples.png)
""")
    return summary
