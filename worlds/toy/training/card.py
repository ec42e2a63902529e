"""The toy model's card: its measured quality, and a picture of what it draws, beside the weights."""

from __future__ import annotations

import json
from pathlib import Path

from dt_lora.base.generate import image_grid
from dt_lora.toy import DEFAULT_GUIDANCE, DEFAULT_STEPS, load, world
from dt_lora.toy.evaluator import Evaluator
from dt_lora.toy.quality import measure


def write_card(out: Path, per_combination: int = 8, evaluator: Path | None = None) -> dict:
    """Measure the pipeline in `out` with the evaluator in `evaluator` (default: `out`/evaluator)."""
    from PIL import Image

    pipeline = load(model_dir=out)
    quality = measure(pipeline, Evaluator.load(evaluator or out / "evaluator"), per_combination=per_combination)
    Image.fromarray(image_grid(quality.images, per_combination)).save(out / "samples.png")
    summary = {
        **quality.generations.summary(),
        "scrambled_none_rate": quality.scrambled_none_rate,
        "clean_none_rate": quality.clean_none_rate,
        "sampler": {"scheduler": "DDIM", "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE},
    }
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    rows = " × ".join(f"{s}" for s in world.SHAPES)
    if type(pipeline).__name__ == "StableDiffusionXLPipeline":
        title, kind = "dt-lora toy SDXL model", (
            "SDXL–style pipeline (two text encoders, CLIPTextModel and CLIPTextModelWithProjection, whose\n"
            "penultimate states are concatenated; the pooled embedding and size ids through the UNet's text-time\n"
            "embedding; SDXL's block types; the toy SD's AutoencoderKL 32×32 → 8×8×4; DDIM)")
    else:
        title, kind = "dt-lora toy model", (
            "Stable Diffusion 1.x–style pipeline (CLIPTextModel, AutoencoderKL 32×32 → 8×8×4,\n"
            "UNet2DConditionModel with cross-attention, DDIM)")
    judge = "`evaluator/`" if evaluator is None else "the toy SD model's `evaluator/`"
    stages = "" if evaluator is None else " --stages sdxl"
    (out / "README.md").write_text(f"""# {title}

A tiny {kind} trained on synthetic 32×32 renders of
{len(world.SHAPES)} shapes in {len(world.COLOURS)} colours, and the evaluator ({judge})
that classifies shape (or "none") and colour. Built by `python -m worlds.toy.build --out DIR{stages}`.

## Measured quality

{per_combination} generations per (shape, colour) pair, prompts cycling through the training
templates, seeds from 1,000,000 (never used in training), DDIM {DEFAULT_STEPS} steps, guidance
{DEFAULT_GUIDANCE}. A colour counts as drawn when the evaluator names it on a recognisable shape.

{quality.table()}

## Samples

`samples.png`: one row per (shape, colour) pair, shapes in the order {rows}, each shape with the
colours {", ".join(world.COLOURS)}.

![samples](samples.png)
""")
    return summary
