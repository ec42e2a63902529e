"""Finite numbers out: nothing dt-lora writes holds a NaN or an inf.

Every .safetensors dt-lora writes (adapters, merged and kohya files, single-file models, checkpoints)
goes through `write_safetensors`, which checks the tensors with `require_finite` and writes
atomically; outputs written by other libraries (a baked diffusers folder) are checked with
`require_finite` before they are saved. A NaN or inf would otherwise load without a word and draw
black images.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from dt_lora.errors import NonFinite
from dt_lora.io import atomic_write


def require_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], what: str,
                   hint: str = "") -> None:
    """Raise `NonFinite` naming the first non-finite tensor of `tensors` (name → tensor) and how many are so.

    `what` names the whole ("the baked model", "adapter x.safetensors"); `hint` says what to do about it.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad, total = [], 0
    for name, tensor in items:
        total += 1
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad.append((name, tensor))
    if bad:
        name, tensor = bad[0]
        counts = f"{int(tensor.isnan().sum())} NaN, {int(tensor.isinf().sum())} inf"
        which = (f"tensor {name} holds NaN or inf ({counts})" if len(bad) == 1
                 else f"{len(bad)} of {total} tensors hold NaN or inf, e.g. {name} ({counts})")
        raise NonFinite(f"{what}: {which}; nothing was written" + (f"; {hint}" if hint else ""))


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None, *, hint: str = "") -> Path:
    """Write `tensors` to `path` as safetensors, atomically, after checking every one is finite."""
    from safetensors.torch import save

    path = Path(path)
    require_finite(tensors, str(path), hint)
    data = save({name: tensor.contiguous() for name, tensor in tensors.items()},
                metadata=dict(metadata) if metadata else None)
    with atomic_write(path) as f:
        f.write(data)
    return path
