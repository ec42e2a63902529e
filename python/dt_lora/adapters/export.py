"""Export shield adapters for other tools.

kohya (sd-scripts, AUTOMATIC1111, ComfyUI): per layer `lora_unet_<module path with _>.lora_down.weight`
(= A), `.lora_up.weight` (= B) and `.alpha`, a 0-d tensor holding the adapter's alpha exactly; a
text-encoder part (the context guard) as `lora_te_text_model_<module path with _>` (SDXL: `lora_te1_…` for
CLIP-L and `lora_te2_…` for OpenCLIP-G, as sd-scripts names them), with its own alpha. The
tools compute scale = alpha / rank from these, so the exported file draws what the adapter draws.
(diffusers' own converter towards this layout writes alpha = rank, which silently changes the scale
whenever the two differ; this one keeps alpha.)

Module paths are diffusers' for SD 1.x/2.x, as sd-scripts names them. For SDXL, sd-scripts (and so
A1111) names the original SGM UNet's blocks, so attention blocks are renamed as single_file's block table
names them (SDXL has 2 layers a block):

    down_blocks.i.attentions.j   →  input_blocks.{3i+j+1}.1
    mid_block.attentions.0       →  middle_block.1
    up_blocks.i.attentions.j     →  output_blocks.{3i+j}.1
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

from dt_lora.adapters import DT_METADATA_KEY, UNET_PREFIX, AdapterFile, adapter_family, lora_layers
from dt_lora.adapters.single_file import UNET_TEXT_TIME, UNET_TRANSFORMER, unet_blocks
from dt_lora.tensorfiles import write_safetensors

KOHYA_PREFIX = "lora_unet_"
# the text encoders' prefixes: SD 1.x/2.x's one encoder, SDXL's two
KOHYA_TEXT_PREFIXES = {"text_encoder": "lora_te_"}
KOHYA_SDXL_TEXT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


SDXL_UNET_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sdxl_unet.json"


@cache
def _sgm_prefixes() -> tuple[tuple[str, str], ...]:
    """(diffusers prefix, SGM prefix) of every block a shield may train, from single_file's block table
    of SDXL's UNet (the toy SDXL has the same block layout at a smaller width)."""
    config = json.loads(SDXL_UNET_CONFIG.read_text())
    return tuple((block.diffusers + ".", block.ldm + ".") for block in unet_blocks(config)
                 if block.table is UNET_TRANSFORMER) + tuple((d, ldm) for d, ldm in UNET_TEXT_TIME)


def sgm_module(module: str) -> str:
    """An SDXL layer's path in the original (SGM) UNet: `down_blocks.1.attentions.0.…` → `input_blocks.4.1.…`,
    `add_embedding.linear_1` (the pooled-path shield) → `label_emb.0.0`."""
    for prefix, sgm in _sgm_prefixes():
        if module.startswith(prefix):
            return sgm + module[len(prefix):]
    raise ValueError(f"adapter layer {module} is not in an SDXL attention block; kohya's SDXL layout has no name for it")


def kohya_key(module: str, family: str = "sd1") -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0` → `lora_unet_down_blocks_0_…_to_out_0`
    (SDXL: `lora_unet_input_blocks_1_1_…`)."""
    return KOHYA_PREFIX + (sgm_module(module) if family == "sdxl" else module).replace(".", "_")


def kohya_alpha(adapter: AdapterFile) -> float:
    """The alpha for which kohya's scale, alpha/rank, is the adapter's scale."""
    if adapter.lora_config.get("use_rslora"):  # peft's scale is alpha/√rank there
        return adapter.scale * adapter.rank
    return adapter.alpha


def kohya_text_key(module: str, encoder: str = "text_encoder", family: str = "sd1") -> str:
    """A layer of text encoder `encoder` (`encoder.layers.0.self_attn.q_proj`, as transformers ≥ 5 names
    CLIPTextModel's modules) → `lora_te_text_model_encoder_layers_0_self_attn_q_proj` (SDXL: `lora_te1_…`,
    `lora_te2_…`), as sd-scripts names it."""
    prefixes = KOHYA_SDXL_TEXT_PREFIXES if family == "sdxl" else KOHYA_TEXT_PREFIXES
    return prefixes[encoder] + (module if module.startswith("text_model.") else "text_model." + module).replace(".", "_")


def to_kohya(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    family = adapter_family(adapter)
    tensors = {}
    for prefix, part in adapter.parts():
        alpha = kohya_alpha(part)
        for module, lora in lora_layers(part, prefix=prefix).items():
            name = (kohya_key(module, family) if prefix == UNET_PREFIX
                    else kohya_text_key(module, prefix[:-1], family))
            tensors[f"{name}.lora_down.weight"] = lora.A.contiguous()
            tensors[f"{name}.lora_up.weight"] = lora.B.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def write_kohya(path: str | Path, adapter: AdapterFile) -> Path:
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": str(kohya_alpha(adapter)),
        DT_METADATA_KEY: json.dumps({"kind": "kohya-lora", "concepts": adapter.concepts}),
    }
    return write_safetensors(path, to_kohya(adapter), metadata)
