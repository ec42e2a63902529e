"""Merge several shield adapters into one file.

Exact (default): per layer, the adapters' ranks are concatenated, so the merged adapter computes
exactly the stacked one:  Σ_i w_i·(α_i/r_i)·B_i A_i  =  [w_1(α_1/r_1)B_1 … ] · [A_1; …]  with the merged
file's alpha equal to its rank (scale 1). A layer that some adapter does not touch gets zero rows.

Compact (`rank=R`): per layer, the summed weight delta is truncated to rank R by SVD; the relative
error of each layer (Frobenius norm) is reported, since whether it is acceptable is an empirical
question for the shielding numbers. A rank R not below the exact merge's rank (the sum of the
adapters' ranks) gives the exact merge, which already computes the stack with no error.

Text-encoder parts (context guards) are merged the same way, always exactly, into the merged file's
text-encoder part; an adapter without one adds nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dt_lora.adapters import (
    TEXT_ENCODERS,
    UNET_PREFIX,
    AdapterError,
    AdapterFile,
    adapter_family,
    check_strengths,
    lora_layers,
    read_adapter,
)
from dt_lora.base.family import label


@dataclass
class MergeResult:
    adapter: AdapterFile
    layer_errors: dict[str, float]  # relative Frobenius error per layer (compact merges only)
    capped_rank: int | None = None  # a compact rank asked for that is not below the exact merge's, which was written

    @property
    def overall_error(self) -> float:
        return max(self.layer_errors.values(), default=0.0)


def _layers(adapter: AdapterFile, source, prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer → (A, B·scale): each adapter's own scale (alpha/rank) folded into B."""
    return {layer: (lora.A.float(), lora.B.float() * lora.scale)
            for layer, lora in lora_layers(adapter, source=source, prefix=prefix).items()}


def check_same_base(adapters: list[AdapterFile], names: list[str]) -> None:
    fingerprints = {}
    for adapter, name in zip(adapters, names):
        for concept in adapter.concepts:
            fingerprints.setdefault(concept.get("base_fingerprint"), []).append(f"{name} ({concept.get('name')})")
    fingerprints.pop(None, None)
    if len(fingerprints) > 1:
        detail = "; ".join(f"{fp}: {', '.join(who)}" for fp, who in fingerprints.items())
        raise AdapterError(f"adapters were trained on different base models ({detail}); pass --force to merge anyway")


def merge_adapters(adapters, weights=None, *, rank: int | None = None, force: bool = False) -> MergeResult:
    """Merge `adapters` (paths, or `AdapterFile`s already read) with `weights` (default: all 1)."""
    adapters = list(adapters)
    if not adapters:
        raise ValueError("nothing to merge: give at least one adapter")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights")
    sources = [f"adapter {i}" if isinstance(a, AdapterFile) else str(a) for i, a in enumerate(adapters)]
    adapters = [a if isinstance(a, AdapterFile) else read_adapter(a) for a in adapters]
    check_strengths(adapters, weights, sources)
    families = {source: label(adapter_family(a)) for a, source in zip(adapters, sources)}
    if len(set(families.values())) > 1:  # not even with --force: the layers mean different things
        detail = ", ".join(f"{Path(source).name}: {name}" for source, name in families.items())
        raise AdapterError(f"adapters are shields of different model families ({detail}); they cannot be merged")
    if not force:
        check_same_base(adapters, [Path(s).name for s in sources])
    capped = None
    if rank is not None and rank >= sum(a.rank for a in adapters):
        # the exact merge already has that rank or less: a larger rank adds only zero rows (a file of
        # gigabytes from a few kilobytes at --rank 100000), and an equal one an SVD that loses nothing
        capped, rank = rank, None
    merged, errors = _merge_part(adapters, weights, sources, rank, UNET_PREFIX)
    for name in TEXT_ENCODERS:  # the text-encoder parts (context guards): always exactly, they are small
        guarded = [i for i, adapter in enumerate(adapters) if name in adapter.text_encoders]
        if guarded:
            merged.text_encoders[name], _ = _merge_part([adapters[i].text_encoders[name] for i in guarded],
                                                        [weights[i] for i in guarded], [sources[i] for i in guarded],
                                                        None, f"{name}.")
    merged.concepts = [{**c, "merge_weight": w} for adapter, w in zip(adapters, weights) for c in adapter.concepts]
    return MergeResult(merged, errors, capped)


def _merge_part(parts: list[AdapterFile], weights, sources, rank: int | None,
                prefix: str) -> tuple[AdapterFile, dict[str, float]]:
    """One part (UNet or text encoder) of each adapter, merged: exactly, or to `rank` by SVD."""
    per_adapter = [_layers(a, source, prefix) for a, source in zip(parts, sources)]
    names = sorted(set().union(*per_adapter))

    shapes: dict[str, tuple[int, int]] = {}
    for layers, source in zip(per_adapter, sources):
        for name, (a, b) in layers.items():
            shape = (b.shape[0], a.shape[1])
            if shapes.setdefault(name, shape) != shape:
                raise AdapterError(f"{source}: layer {name} is {shape[0]}×{shape[1]}, another adapter's is "
                                   f"{shapes[name][0]}×{shapes[name][1]}; these adapters cannot be merged")

    out: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    total_rank = sum(a.rank for a in parts)
    merged_rank = rank if rank is not None else total_rank
    for name in names:
        out_features, in_features = shapes[name]
        if rank is None:
            a_parts, b_parts = [], []
            for layers, adapter, weight in zip(per_adapter, parts, weights):
                a, b = layers.get(name, (torch.zeros(adapter.rank, in_features), torch.zeros(out_features, adapter.rank)))
                a_parts.append(a)
                b_parts.append(b * weight)
            out[f"{name}.lora_A.weight"] = torch.cat(a_parts, 0)
            out[f"{name}.lora_B.weight"] = torch.cat(b_parts, 1)
        else:
            delta = sum(w * (layers[name][1] @ layers[name][0]) for layers, w in zip(per_adapter, weights) if name in layers)
            u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
            r = min(rank, s.numel())
            b = (u[:, :r] * s[:r]).float()
            a = vh[:r].float()
            if r < rank:  # a layer narrower than the rank: pad so every layer has the file's rank
                b = torch.cat([b, torch.zeros(out_features, rank - r)], 1)
                a = torch.cat([a, torch.zeros(rank - r, in_features)], 0)
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a, b
            norm = delta.norm()
            errors[name] = float((delta - b @ a).norm() / norm) if norm > 0 else 0.0

    targets = sorted({t for adapter in parts for t in adapter.lora_config.get("target_modules", [])})
    # scale 1 (each adapter's own scale is folded into B), whatever options the first adapter had
    config = {**parts[0].lora_config, "r": merged_rank, "lora_alpha": merged_rank, "target_modules": targets,
              "use_rslora": False}
    return AdapterFile(out, config), errors
