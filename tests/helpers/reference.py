"""Plain torch reference for the Scrambled-Grid kernels (tests only).

Deliberately simple: a Python loop over tiles with slicing, flip and
transpose, independent of the Rust row kernels it checks.
"""

from __future__ import annotations

import numpy as np
import torch


def as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def reference_scramble(
    x: torch.Tensor | np.ndarray,
    tiles: torch.Tensor | np.ndarray,
    transforms: torch.Tensor | np.ndarray,
    layout: str = "NCHW",
) -> torch.Tensor:
    """Apply a plan: output tile p shows source tile tiles[n].flatten()[p],
    transformed by transforms[n].flatten()[p].

    `x` is 3-D (one image; plan has N = 1) or 4-D in `layout` ("NCHW" or
    "NHWC"); `tiles`/`transforms` are (N, rows, cols). Returns a tensor of the
    same shape, dtype and layout as `x`.
    """
    x = as_tensor(x)
    tiles, transforms = as_tensor(tiles), as_tensor(transforms)
    n_plans, rows, cols = tiles.shape
    batch = x if x.ndim == 4 else x[None]
    if layout == "NHWC":
        batch = batch.permute(0, 3, 1, 2)
    n, _, h, w = batch.shape
    assert n == n_plans, (n, n_plans)
    th, tw = h // rows, w // cols

    out = torch.empty_like(batch)
    for i in range(n):
        for p in range(rows * cols):
            src = int(tiles[i].flatten()[p])
            code = int(transforms[i].flatten()[p])
            sr, sc = divmod(src, cols)
            pr, pc = divmod(p, cols)
            tile = batch[i, :, sr * th : (sr + 1) * th, sc * tw : (sc + 1) * tw]
            if code & 2:
                tile = tile.flip(-2)  # rows axis
            if code & 1:
                tile = tile.flip(-1)  # cols axis
            if code & 4:
                tile = tile.transpose(-2, -1)
            out[i, :, pr * th : (pr + 1) * th, pc * tw : (pc + 1) * tw] = tile

    if layout == "NHWC":
        out = out.permute(0, 2, 3, 1)
    return (out if x.ndim == 4 else out[0]).contiguous()


def image_tiles(x: np.ndarray, rows: int, cols: int) -> list[bytes]:
    """The tiles of one HWC image as bytes, in row-major order."""
    h, w = x.shape[:2]
    th, tw = h // rows, w // cols
    return [
        np.ascontiguousarray(x[r * th : (r + 1) * th, c * tw : (c + 1) * tw]).tobytes()
        for r in range(rows)
        for c in range(cols)
    ]
