"""Export shield adapters for other tools.

kohya (sd-scripts, AUTOMATIC1111, ComfyUI): per layer `lora_unet_<module path with _>.lora_down.weight`
(= A), `.lora_up.weight` (= B) and `.alpha`, a 0-d tensor holding the adapter's alpha exactly. The
tools compute scale = alpha / rank from these, so the exported file draws what the adapter draws.
(diffusers' own converter towards this layout writes alpha = rank, which silently changes the scale
whenever the two differ; this one keeps alpha.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .adapters import DT_METADATA_KEY, AdapterFile, lora_layers
from .io import atomic_write

KOHYA_PREFIX = "lora_unet_"


def kohya_key(module: str) -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0` → `lora_unet_down_blocks_0_…_to_out_0`."""
    return KOHYA_PREFIX + module.replace(".", "_")


def kohya_alpha(adapter: AdapterFile) -> float:
    """The alpha for which kohya's scale, alpha/rank, is the adapter's scale."""
    if adapter.lora_config.get("use_rslora"):  # peft's scale is alpha/√rank there
        return adapter.scale * adapter.rank
    return adapter.alpha


def to_kohya(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    alpha = kohya_alpha(adapter)
    tensors = {}
    for module, lora in lora_layers(adapter).items():
        name = kohya_key(module)
        tensors[f"{name}.lora_down.weight"] = lora.A.contiguous()
        tensors[f"{name}.lora_up.weight"] = lora.B.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def write_kohya(path: str | Path, adapter: AdapterFile) -> Path:
    from safetensors.torch import save

    path = Path(path)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": str(kohya_alpha(adapter)),
        DT_METADATA_KEY: json.dumps({"concepts": adapter.concepts}),
    }
    with atomic_write(path) as f:
        f.write(save(to_kohya(adapter), metadata=metadata))
    return path
