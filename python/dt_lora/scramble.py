"""Scrambled Grid: cut images into a grid of tiles and shuffle the tiles.

A typed wrapper over the native kernels in `dt_lora._native`. Every image gets
its own random stream keyed by `(seed, offset + index)`, so results do not
depend on batch splitting or thread count: scrambling images 0..9 in one call
equals scrambling 0..3 with `offset=0` and 4..9 with `offset=4`.

A plan says, for each output tile position `p` (row-major over the grid), which
source tile is shown there (`tiles`) and how it is transformed (`transforms`):
bit 0 flips horizontally, bit 1 vertically, bit 2 transposes (square tiles
only), applied to the source tile in the order vertical, horizontal, transpose.

Inputs are torch CPU tensors or numpy arrays; outputs are of the same kind.
torch is never imported by this module: a tensor's presence implies it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from dt_lora import _native
from dt_lora.errors import UserError

Grid = int | tuple[int, int]
ArrayT = TypeVar("ArrayT")  # np.ndarray or torch.Tensor

_LAYOUTS = ("NCHW", "NHWC")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MAX_U64 = 2**64 - 1


class GridError(UserError, ValueError):
    """A grid that cannot cut or scramble the images it is given (too small, too large, not dividing
    them, or a single tile where a derangement was asked for)."""


class GridPlan(NamedTuple):
    """Per-image tile plan, arrays of shape (N, rows, cols)."""

    tiles: Any
    """int64: index of the source tile shown at each output tile position."""
    transforms: Any
    """uint8: transform code of each output tile (0 = none)."""


# ---------------------------------------------------------------- validation


def _parse_grid(grid: Grid) -> tuple[int, int]:
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        rows = cols = int(grid)
    elif (
        isinstance(grid, (tuple, list))
        and len(grid) == 2
        and all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in grid)
    ):
        rows, cols = int(grid[0]), int(grid[1])
    else:
        raise TypeError(f"grid must be an int or a (rows, cols) pair of ints, got {grid!r}")
    if rows < 1 or cols < 1:
        raise GridError(f"grid must be at least 1x1, got {rows}x{cols}")
    return rows, cols


def _check_derangeable(rows: int, cols: int, derange: bool) -> None:
    """A derangement moves every tile, which a single tile cannot do: refused rather than copied."""
    if derange and rows * cols == 1:
        raise GridError(
            "grid 1x1 has a single tile, which cannot be moved: use a grid of at least 2 tiles "
            "(e.g. 2 or 1x2), or turn derangement off (--no-derange) to copy the image unchanged"
        )


def _tile_shape(height: int, width: int, rows: int, cols: int, what: str = "image") -> tuple[int, int]:
    if rows > height or cols > width:
        raise GridError(
            f"grid {rows}x{cols} is larger than the {height}x{width} {what}: a tile needs at least 1 pixel"
        )
    if height % rows or width % cols:
        raise GridError(
            f"{what} height x width {height}x{width} is not divisible by the grid {rows}x{cols}; "
            "crop or resize it first"
        )
    return height // rows, width // cols


def _check_u64(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= int(value) <= _MAX_U64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return int(value)


def _torch_module(x: object) -> Any | None:
    """torch, if `x` is a torch tensor (then torch is already imported)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


def _check_array(x: object, name: str) -> Any | None:
    """Check kind, device, rank and contiguity; return torch or None."""
    torch = _torch_module(x)
    if torch is None and not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if torch is not None and x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device}; the scramble kernels run on CPU: move it with .cpu() first")
    if x.ndim not in (3, 4):
        raise ValueError(f"{name} must be 3-D (one image) or 4-D (a batch), got shape {tuple(x.shape)}")
    if x.ndim == 4 and x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch, shape {tuple(x.shape)}")
    contiguous = x.is_contiguous() if torch is not None else x.flags.c_contiguous
    if not contiguous:
        raise ValueError(
            f"{name} with shape {tuple(x.shape)} is not C-contiguous in memory; make it contiguous "
            "(.contiguous() / np.ascontiguousarray) or, for channels-last data, pass the NHWC view "
            "with layout='NHWC'"
        )
    return torch


def _bits_view(x: Any, torch: Any | None, name: str) -> tuple[np.ndarray, Callable[..., None]]:
    """A numpy view of `x`'s raw bits and the native kernel for that width."""
    if torch is not None:
        int_views = {
            torch.uint8: torch.uint8,
            torch.float16: torch.int16,
            torch.bfloat16: torch.int16,
            torch.float32: torch.int32,
        }
        if x.dtype not in int_views:
            raise TypeError(
                f"{name} has unsupported dtype {x.dtype}; use uint8, float16, bfloat16 or float32"
            )
        x = x.detach().view(int_views[x.dtype]).numpy()
    elif x.dtype not in (np.uint8, np.float16, np.float32):
        raise TypeError(f"{name} has unsupported dtype {x.dtype}; use uint8, float16 or float32")
    kernels = {
        1: (np.uint8, _native.scramble_u8),
        2: (np.uint16, _native.scramble_u16),
        4: (np.uint32, _native.scramble_u32),
    }
    bits, kernel = kernels[x.dtype.itemsize]
    return x.view(bits), kernel


def _layout_is_channels_last(layout: str) -> bool:
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use 'NCHW' or 'NHWC'")
    return layout == "NHWC"


def _native_plan(
    n: int, rows: int, cols: int, tile_hw: tuple[int, int], seed: int, offset: int, derange: bool, flips: bool
) -> GridPlan:
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"number of images must be a non-negative int, got {n!r}")
    seed = _check_u64("seed", seed)
    offset = _check_u64("offset", offset)
    tiles, transforms = _native.grid_plan(
        int(n), rows, cols, tile_hw[0] == tile_hw[1], seed, offset, bool(derange), bool(flips)
    )
    return GridPlan(tiles, transforms)


def _plan_like(plan: GridPlan, torch: Any | None) -> GridPlan:
    if torch is None:
        return plan
    return GridPlan(torch.from_numpy(plan.tiles), torch.from_numpy(plan.transforms))


# ---------------------------------------------------------------- public API


def grid_plan(
    n: int,
    grid: Grid,
    image_hw: tuple[int, int],
    seed: int,
    *,
    derange: bool = True,
    flips: bool = False,
    offset: int = 0,
) -> GridPlan:
    """The plans `scramble_grid` would use for `n` images of size `image_hw`.

    Returns numpy arrays. `image_hw` matters only for divisibility checks and
    for whether tiles are square (transposes are drawn only then). A 1x1 grid
    with `derange` is a `GridError`: its one tile cannot move.
    """
    rows, cols = _parse_grid(grid)
    _check_derangeable(rows, cols, derange)
    tile_hw = _tile_shape(int(image_hw[0]), int(image_hw[1]), rows, cols)
    return _native_plan(n, rows, cols, tile_hw, seed, offset, derange, flips)


def scramble_grid(
    x: ArrayT,
    grid: Grid,
    seed: int,
    *,
    layout: str = "NCHW",
    derange: bool = True,
    flips: bool = False,
    return_perm: bool = False,
    offset: int = 0,
) -> ArrayT | tuple[ArrayT, GridPlan]:
    """Scramble images into a shuffled grid of tiles, bit-exactly.

    Args:
        x: torch CPU tensor or numpy array, dtype uint8, float16, bfloat16
            (torch only) or float32; one image (3-D) or a batch (4-D),
            C-contiguous.
        grid: tiles per side, or (rows, cols). Height and width must be
            divisible by it; nothing is cropped.
        seed: run seed in [0, 2**64).
        layout: "NCHW" (CHW for one image) or "NHWC" (HWC).
        derange: no tile stays in place. A 1x1 grid cannot be deranged and
            is a `GridError`; without `derange` it returns a copy.
        flips: also flip (and, for square tiles, transpose) each tile.
        return_perm: also return the `GridPlan` used, shape (N, rows, cols)
            (N = 1 for one image), as arrays of x's kind.
        offset: index of x's first image in the whole run.

    Returns:
        The scrambled images, same kind, dtype, shape and layout as x
        (and the plan if `return_perm`).
    """
    torch = _check_array(x, "x")
    bits, kernel = _bits_view(x, torch, "x")
    channels_last = _layout_is_channels_last(layout)
    rows, cols = _parse_grid(grid)
    _check_derangeable(rows, cols, derange)
    batch = bits if bits.ndim == 4 else bits[None]
    height, width = batch.shape[1:3] if channels_last else batch.shape[2:4]
    tile_hw = _tile_shape(height, width, rows, cols)
    plan = _native_plan(batch.shape[0], rows, cols, tile_hw, seed, offset, derange, flips)

    if torch is not None:
        out = torch.empty(tuple(x.shape), dtype=x.dtype)
        out_bits, _ = _bits_view(out, torch, "out")
    else:
        out = np.empty(x.shape, dtype=x.dtype)
        out_bits = out.view(bits.dtype)
    kernel(batch, out_bits if out_bits.ndim == 4 else out_bits[None], channels_last, plan.tiles, plan.transforms)
    return (out, _plan_like(plan, torch)) if return_perm else out


def _float_dtype_name(dtype: Any) -> str:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in ("float32", "float16"):
        raise TypeError(f"dtype must be float32 or float16, got {dtype!r}")
    return name


def prepare_images(
    images: ArrayT,
    grid: Grid,
    seed: int,
    *,
    dtype: Any = "float32",
    derange: bool = True,
    flips: bool = False,
    return_perm: bool = False,
    offset: int = 0,
) -> ArrayT | tuple[ArrayT, GridPlan]:
    """Decoded uint8 NHWC images -> scrambled NCHW values in [-1, 1], fused.

    Equals scrambling with `scramble_grid(images, ..., layout="NHWC")` and then
    mapping each byte v to `v * 2 / 255 - 1` (computed in float64, rounded to
    float32, then to float16 if asked) and moving channels first; done in a
    single pass over memory. `images` is (N, H, W, C) or one (H, W, C) image;
    the result is (N, C, H, W) or (C, H, W) of `dtype` (float32 or float16,
    numpy or torch spelling), of the same kind (torch/numpy) as `images`.

    Grid 1 (1x1) is the conversion alone, unscrambled: `derange` and `flips`
    do not apply to it. Callers use it to turn anchors and evaluation images
    into model input; a grid meant to scramble must have at least 2 tiles
    (`scramble_grid` and `grid_plan` refuse a 1x1 grid with `derange`).
    """
    torch = _check_array(images, "images")
    if images.dtype != (torch.uint8 if torch is not None else np.uint8):
        raise TypeError(f"images must be uint8 (decoded pixels), got dtype {images.dtype}")
    dtype_name = _float_dtype_name(dtype)
    rows, cols = _parse_grid(grid)
    src = images.numpy() if torch is not None else images
    batch = src if src.ndim == 4 else src[None]
    n, height, width, channels = batch.shape
    tile_hw = _tile_shape(height, width, rows, cols)
    unscrambled = rows * cols == 1  # the native planner refuses to derange a single tile
    plan = _native_plan(n, rows, cols, tile_hw, seed, offset, derange and not unscrambled, flips)

    out_shape = (n, channels, height, width) if src.ndim == 4 else (channels, height, width)
    if torch is not None:
        out = torch.empty(out_shape, dtype=getattr(torch, dtype_name))
        out_np = out.numpy() if dtype_name == "float32" else out.view(torch.int16).numpy()
    else:
        out = np.empty(out_shape, dtype=dtype_name)
        out_np = out
    if dtype_name == "float32":
        kernel, out_view = _native.prepare_f32, out_np
    else:
        kernel, out_view = _native.prepare_f16, out_np.view(np.uint16)
    kernel(batch, out_view if out_view.ndim == 4 else out_view[None], plan.tiles, plan.transforms)
    return (out, _plan_like(plan, torch)) if return_perm else out


# ---------------------------------------------------------------- folders


def list_images(folder: Path) -> list[Path]:
    """PNG/JPEG files in `folder`, sorted by name (the run's image order)."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES),
        key=lambda p: p.name,
    )


def scramble_folder(
    in_dir: str | Path,
    out_dir: str | Path,
    grid: Grid,
    seed: int,
    *,
    derange: bool = True,
    flips: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Scramble every PNG/JPEG in `in_dir` into a PNG of the same stem in `out_dir`.

    Image i of the name-sorted listing uses stream `offset = i`, so the output
    is reproducible. Everything is checked before anything is written: missing
    folder, no images, name clashes, existing outputs (unless `overwrite`, and
    then only files an earlier dt-lora run wrote there, see
    `dt_lora.io.claim_output_files`), a 1x1 grid with `derange`, damaged or
    unsupported images (every file is decoded), sizes the grid does not fit.
    Files are read by `dt_lora.images.read_pixels`: any mode and bit depth
    becomes 8 bits, upright, keeping its grey / alpha channels; the outputs are
    8-bit PNGs with those channels. Each file is written atomically and
    recorded in `out_dir`'s `dt_lora.json`. Returns the written paths.
    """
    from tqdm import tqdm

    from dt_lora.images import read_pixels, write_pngs
    from dt_lora.io import claim_output_files

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"input folder {in_dir} does not exist or is not a folder")
    sources = list_images(in_dir)
    if not sources:
        raise ValueError(f"no PNG or JPEG images found in {in_dir}")
    rows, cols = _parse_grid(grid)
    _check_derangeable(rows, cols, derange)

    targets: dict[str, Path] = {}
    for src in sources:
        target = out_dir / f"{src.stem}.png"
        if target.name in targets:
            raise ValueError(f"{targets[target.name].name} and {src.name} would both be written to {target.name}")
        if target.resolve() == src.resolve():
            raise ValueError(f"output {target} would overwrite its own input; use another OUT_DIR")
        targets[target.name] = src
    with claim_output_files(out_dir, targets, overwrite):
        for src in sources:  # decoded twice (here and below) so that a damaged file stops the run before any output
            pixels = read_pixels(src)
            _tile_shape(pixels.shape[0], pixels.shape[1], rows, cols, what=f"image {src}")
        scrambled = (
            (name, scramble_grid(read_pixels(src), (rows, cols), seed, layout="NHWC", derange=derange, flips=flips,
                                 offset=index))
            for index, (name, src) in enumerate(tqdm(targets.items(), desc="scramble", unit="img",
                                                     disable=not progress)))
        return write_pngs(out_dir, scrambled, "scramble")
