"""Shield adapter files: LoRA weights in diffusers/peft key format plus dt-lora provenance.

An adapter is one .safetensors file that diffusers' `load_lora_weights` loads as it is:

- tensors `unet.<module path>.lora_A.weight` / `.lora_B.weight`;
- metadata `lora_adapter_metadata`: the peft `LoraConfig` (rank, alpha, targets), with keys
  prefixed `unet.` as diffusers writes and reads them, so alpha ≠ rank keeps its scale;
- metadata `dt_lora`: JSON `{"concepts": [...]}`, one entry per shielded concept (recipe summary,
  base model and its UNet fingerprint, version, training time). A merged file lists several.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io import atomic_write

LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DT_METADATA_KEY = "dt_lora"
UNET_PREFIX = "unet."


class AdapterError(ValueError):
    """An adapter file is missing, not safetensors, damaged, or not a dt-lora/diffusers LoRA."""


@dataclass
class AdapterFile:
    weights: dict[str, torch.Tensor]  # UNet module keys without the "unet." prefix
    lora_config: dict  # peft LoraConfig.to_dict(), JSON-ready
    concepts: list[dict] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.lora_config["r"])

    @property
    def alpha(self) -> float:
        return float(self.lora_config["lora_alpha"])

    @classmethod
    def from_training(cls, weights: dict[str, torch.Tensor], *, recipe, base: str, base_fingerprint: str,
                      version: str, seconds: float) -> "AdapterFile":
        from peft import LoraConfig

        config = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha,
                            target_modules=list(recipe.lora.targets), init_lora_weights="gaussian")
        concept = {
            "name": recipe.name,
            "prompts": recipe.target_prompts,
            "paraphrases": recipe.target.paraphrases,
            "anchors": recipe.anchor_prompts,
            "scramble": {"grid": recipe.scramble.grid, "space": recipe.scramble.space, "flips": recipe.scramble.flips},
            "lora": {"rank": recipe.lora.rank, "alpha": recipe.lora.alpha, "targets": list(recipe.lora.targets),
                     "text_local": recipe.lora.text_local},
            "train": {"steps": recipe.train.steps, "seed": recipe.train.seed, "learning_rate": recipe.train.learning_rate,
                      "preservation": recipe.train.preservation,
                      "preservation_weight": recipe.train.preservation_weight,
                      "anchor_scale_jitter": recipe.train.anchor_scale_jitter},
            "sampling": {"steps": recipe.sampling.steps, "guidance": recipe.sampling.guidance},
            "base": base,
            "base_fingerprint": base_fingerprint,
            "dt_lora_version": version,
            "training_seconds": round(seconds, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return cls({k: v.detach().float().cpu() for k, v in weights.items()}, _jsonable(config.to_dict()), [concept])


def _jsonable(config: dict) -> dict:
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def write_adapter(path: str | Path, adapter: AdapterFile) -> Path:
    """Write atomically: readers see the old file or the whole new one, never a partial one."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {UNET_PREFIX + k: v.contiguous() for k, v in adapter.weights.items()}
    metadata = {
        "format": "pt",
        LORA_METADATA_KEY: json.dumps({UNET_PREFIX + k: v for k, v in adapter.lora_config.items()}, sort_keys=True),
        DT_METADATA_KEY: json.dumps({"concepts": adapter.concepts}),
    }
    with atomic_write(path) as f:
        f.write(save(tensors, metadata=metadata))
    return path


def read_adapter(path: str | Path) -> AdapterFile:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{path}: not a readable .safetensors file ({error})") from None
    if LORA_METADATA_KEY not in metadata:
        raise AdapterError(f"{path}: no '{LORA_METADATA_KEY}' metadata; not a dt-lora/diffusers LoRA adapter")
    try:
        lora = json.loads(metadata[LORA_METADATA_KEY])
        concepts = json.loads(metadata.get(DT_METADATA_KEY, '{"concepts": []}'))["concepts"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise AdapterError(f"{path}: damaged metadata ({error})") from None
    config = {k[len(UNET_PREFIX):]: v for k, v in lora.items() if k.startswith(UNET_PREFIX)}
    if "r" not in config or "lora_alpha" not in config:
        raise AdapterError(f"{path}: metadata '{LORA_METADATA_KEY}' lacks unet.r / unet.lora_alpha")
    weights = {}
    for key, value in tensors.items():
        if not key.startswith(UNET_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise AdapterError(f"{path}: unexpected tensor {key!r} (expected unet.*.lora_A/B.weight)")
        weights[key[len(UNET_PREFIX):]] = value
    if not weights:
        raise AdapterError(f"{path}: holds no LoRA tensors")
    return AdapterFile(weights, config, concepts)


def load_adapters(pipeline, paths, weights=None) -> list[str]:
    """Stack adapters on a pipeline (diffusers `load_lora_weights` + `set_adapters`); returns their names.

    Names are `shield0`, `shield1`, …; `unload_adapters(pipeline)` removes them again.
    """
    paths = [Path(p) for p in paths]
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ValueError(f"got {len(paths)} adapters but {len(weights)} weights")
    from .base import diffusers_errors_only

    names = []
    for index, path in enumerate(paths):
        read_adapter(path)  # clear errors for missing, damaged or foreign files before diffusers sees them
        name = f"shield{index}"
        # shields hold UNet layers only; diffusers would warn that the text encoder got none
        with diffusers_errors_only():
            pipeline.load_lora_weights(str(path), adapter_name=name)
        names.append(name)
    pipeline.set_adapters(names, adapter_weights=weights)
    return names


def unload_adapters(pipeline) -> None:
    pipeline.unload_lora_weights()
