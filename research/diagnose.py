"""Where a shield (or a stack of them) changes the UNet: ‖ΔW·x‖ / ‖W·x‖ per layer type, off and on target.

    python -m research.diagnose toy-circle.safetensors [toy-red.safetensors ...]

x are the inputs each LoRA layer sees while the toy UNet denoises random latents at random timesteps
for up to 200 prompts of the recipes' and tuning phrasings (`toy.phrasings`): "off target" prompts name
no shielded concept, "on target" prompts name the first one. A local shield changes its layers a lot
on target and little off target; research/ has the table for the free and the text-local kinds.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from dt_lora import toy
from dt_lora.adapters import lora_layers, read_adapter
from dt_lora.base.family import encode_prompts
from dt_lora.toy import phrasings
from research.stacking import toy_concept


def layer_kind(layer: str) -> str:
    """`…attn2.to_out.0` → `attn2.to_out`, `…attn1.to_q` → `attn1.to_q`."""
    parts = layer.split(".")
    return ".".join(parts[-3:-1]) if parts[-2] == "to_out" else ".".join(parts[-2:])


def relative_change(pipeline, adapters: list[Path], prompts: list[str], seed: int = 0) -> dict[str, float]:
    """Mean over layers of each kind of ‖ΔW·x‖ / ‖W·x‖, ΔW the stacked adapters' summed delta."""
    deltas: dict[str, torch.Tensor] = {}
    for path in adapters:
        for layer, pair in lora_layers(read_adapter(path)).items():
            deltas[layer] = deltas.get(layer, 0) + pair.delta()
    modules = dict(pipeline.unet.named_modules())
    inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [modules[layer].register_forward_hook(lambda m, args, out, layer=layer: inputs[layer].append(args[0]))
             for layer in deltas]
    generator = torch.Generator().manual_seed(seed)
    config = pipeline.unet.config
    latents = torch.randn(len(prompts), config.in_channels, config.sample_size, config.sample_size, generator=generator)
    timesteps = torch.randint(0, pipeline.scheduler.config.num_train_timesteps, (len(prompts),), generator=generator)
    try:
        with torch.no_grad():
            pipeline.unet(latents, timesteps, **encode_prompts(pipeline, prompts).unet_inputs())
    finally:
        for hook in hooks:
            hook.remove()
    ratios = defaultdict(list)
    with torch.no_grad():
        for layer, delta in deltas.items():
            x = torch.cat(inputs[layer]).reshape(-1, delta.shape[1])
            ratios[layer_kind(layer)].append(float((x @ delta.T).norm() / (x @ modules[layer].weight.T).norm()))
    return {kind: sum(values) / len(values) for kind, values in sorted(ratios.items())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.diagnose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", type=Path, nargs="+", help="toy shields, stacked")
    args = parser.parse_args(argv)
    concepts = [toy_concept(a) for a in args.adapters]
    prompts = phrasings.family_prompts({**phrasings.STANDARD_FAMILIES, **phrasings.TUNING_FAMILIES})
    off = [p.text for p in prompts if not any(p.names(c) for c in concepts)][:200]
    on = [p.text for p in prompts if p.names(concepts[0])][:200]
    pipeline = toy.load()
    off_change, on_change = relative_change(pipeline, args.adapters, off), relative_change(pipeline, args.adapters, on)
    print(f"{' + '.join(concepts)}: ‖ΔW·x‖ / ‖W·x‖")
    print("| layer type | off target | on target (" + concepts[0] + ") |\n|---|---|---|")
    for kind in off_change:
        print(f"| {kind} | {off_change[kind]:.2f} | {on_change[kind]:.2f} |")


if __name__ == "__main__":
    main()
