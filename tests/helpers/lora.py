"""Shared by the adapter tests: random LoRA adapters on chosen layers, a fixed UNet probe, the
concepts of conftest's `toy_shields` (the shipped shields), and a demo folder holding trained shields."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dt_lora.adapters import AdapterFile

SHIELDED = ("circle", "red")  # one shape, one colour: measured alone and as a pair
STACKED = ("circle", "red", "square", "blue")  # the keys of the `toy_shields` fixture: stacked all four
# the demo's two shields trained on the toy SDXL (`python -m worlds.toy.shields --base toy-sdxl --out …`)
SDXL_SHIELDS = Path(__file__).resolve().parents[1] / "data" / "sdxl-shields"  # tests/data


def demo_folder(out: Path, shields) -> Path:
    """`out`, a `dt-lora demo` folder holding `shields` as a first run would have left them: the demo
    reuses them and only merges, bakes and evaluates."""
    (out / "shields").mkdir(parents=True)
    for path in shields:
        shutil.copy(path, out / "shields")
    return out


def random_adapter(unet, layers, rank, alpha, seed, name, fingerprint="same-base") -> AdapterFile:
    """An adapter with random A and B (large enough to change the output) on `layers` of `unet`."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    weights = {}
    for layer in layers:
        out_features, in_features = modules[layer].weight.shape
        weights[f"{layer}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.3
        weights[f"{layer}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.3
    config = {"r": rank, "lora_alpha": alpha, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
              "peft_type": "LORA", "bias": "none"}
    return AdapterFile(weights, config, [{"name": name, "base_fingerprint": fingerprint}])


def unet_output(unet) -> torch.Tensor:
    """The UNet's noise prediction for a fixed random input, at a high and a low timestep."""
    config = unet.config
    size = config.sample_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, size, size, generator=generator)
    text = torch.randn(2, 16, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(x.to(unet.dtype), torch.tensor([700, 50]), text.to(unet.dtype)).sample.float()
