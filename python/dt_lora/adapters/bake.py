"""Bake shield adapters into full model weights, for tools that take a checkpoint and no LoRA.

The adapters are merged exactly (`merge.merge_adapters`: the merged delta is what the stack adds) and
each attention weight gets W ← W + Σ wᵢ·(αᵢ/rᵢ)·BᵢAᵢ in float32, before the pipeline is cast to the
output dtype; an adapter's text-encoder part (its context guard) goes into the text encoder's weights
the same way. No LoRA layer is left, so the UNet is a plain `UNet2DConditionModel`: ControlNet
(`ControlNetModel.from_unet`, `StableDiffusionControlNetPipeline`) and every SD tool use it as is.

Formats:
  diffusers    a pipeline folder (`save_pretrained`) plus `dt_lora.json` (shielded concepts, base,
               baked UNet fingerprint, the folder's files); written under a temporary name and moved
               into place
  single-file  one .safetensors in the original SD key layout (`single_file.py`), the provenance in
               its metadata under `dt_lora`; what AUTOMATIC1111 and ComfyUI load
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dt_lora.adapters import (
    DT_METADATA_KEY,
    check_fits,
    lora_layers,
    part_models,
    pipeline_text_encoders,
    read_adapter,
    read_adapters,
)
from dt_lora.adapters.merge import merge_adapters
from dt_lora.base import describe, diffusers_errors_only, load_pipeline, unet_fingerprint
from dt_lora.tensorfiles import require_finite

FORMATS = ("diffusers", "single-file")


@dataclass
class BakeResult:
    out: Path
    concepts: list[dict]
    unet_fingerprint: str  # of the baked UNet, as `dt-lora train --base OUT` would record it


def fuse_adapters(pipeline, adapters, weights=None, *, force: bool = False) -> list[dict]:
    """Add the adapters' deltas to `pipeline.unet`'s weights (and their guards' to the text encoders')
    in place; returns their concepts.

    Refuses adapters that do not fit this UNet (`check_fits`: a missing or differently shaped layer;
    a base fingerprint other than this UNet's, unless `force`) before any weight changes.
    """
    paths = [Path(p) for p in adapters]
    read = [read_adapter(p) for p in paths]
    text_encoders = pipeline_text_encoders(pipeline)
    check_fits(read, pipeline.unet, force=force, sources=paths, text_encoders=text_encoders)
    merged = merge_adapters(read, weights, force=force).adapter
    models = part_models(pipeline.unet, text_encoders)
    with torch.no_grad():
        for prefix, part in merged.parts():
            modules = dict(models[prefix].named_modules())
            for layer, lora in lora_layers(part, prefix=prefix).items():
                weight = getattr(modules[layer], "base_layer", modules[layer]).weight  # check_fits: a Linear of this shape
                weight.add_(lora.delta().to(weight.dtype))
    return merged.concepts


def bake(base: str, adapters, out: str | Path, *, format: str = "diffusers", weights=None,
         dtype: torch.dtype = torch.float16, force: bool = False, overwrite: bool = False,
         allow_pickle: bool | None = None) -> BakeResult:
    """Load `base`, fuse `adapters` into its UNet and write the full model to `out` in `format`.

    With `overwrite`, an existing `out` is replaced only if dt-lora wrote it (`io.claim_output`). A model
    whose weights are not all finite in `dtype` (a shield weight so large that float16 overflows) is
    refused, and nothing is written.
    """
    from dt_lora.io import atomic_directory, claim_output

    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    if format == "single-file" and out.suffix != ".safetensors":
        raise ValueError(f"--format single-file writes one .safetensors file; got {out}")
    kind = "model" if format == "diffusers" else "single-file"
    with claim_output(out, overwrite, kind=kind):
        read_adapters(adapters, weights)  # a malformed adapter fails now, not after loading a large base model
        pipeline = load_pipeline(base, allow_pickle=allow_pickle)
        concepts = fuse_adapters(pipeline, adapters, weights, force=force)
        with diffusers_errors_only():  # "modules that should be kept in float32: []": SD has none
            pipeline.to(dtype)
        require_finite(((f"{name}.{key}", value) for name, component in pipeline.components.items()
                        if isinstance(component, torch.nn.Module) for key, value in component.state_dict().items()),
                       f"the baked model ({str(dtype).removeprefix('torch.')})",
                       "lower the adapter weights" + (", or bake with --dtype float32" if dtype != torch.float32 else ""))
        fingerprint = unet_fingerprint(pipeline.unet)
        provenance = {"concepts": concepts, "base": describe(base), "baked_unet_fingerprint": fingerprint}
        if format == "diffusers":
            with atomic_directory(out, kind=kind, command="bake", overwrite=overwrite, **provenance) as folder:
                pipeline.save_pretrained(folder, safe_serialization=True)
        else:
            from dt_lora.adapters.single_file import write_single_file

            write_single_file(pipeline, out, metadata={DT_METADATA_KEY: json.dumps({"kind": kind, **provenance})})
    return BakeResult(out, concepts, fingerprint)
