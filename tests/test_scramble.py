"""Tests for dt_lora.scramble: native kernels against the torch reference."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.reference import image_tiles, reference_scramble
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dt_lora import GridPlan, _native, grid_plan, prepare_images, scramble_grid
from dt_lora.errors import UserError
from dt_lora.scramble import GridError, scramble_folder

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BIT_VIEWS = {  # dtype name -> (torch int view, numpy int view) for bit comparisons
    "uint8": (torch.uint8, np.uint8),
    "float16": (torch.int16, np.uint16),
    "bfloat16": (torch.int16, None),
    "float32": (torch.int32, np.uint32),
}


def random_images(shape: tuple[int, ...], dtype: str, use_torch: bool, seed: int) -> torch.Tensor | np.ndarray:
    """Random bit patterns (NaNs and infs included: the kernels only move bits)."""
    rng = np.random.default_rng(seed)
    itemsize = {"uint8": 1, "float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    bits = rng.integers(0, 2 ** (8 * itemsize), size=shape, dtype=np.uint64)
    bits = bits.astype({1: np.uint8, 2: np.uint16, 4: np.uint32}[itemsize])
    if dtype == "bfloat16":
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    array = bits.view(dtype)
    return torch.from_numpy(array) if use_torch else array


def as_bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        name = str(x.dtype).removeprefix("torch.")
        return x.view(BIT_VIEWS[name][0]).numpy()
    return x.view(BIT_VIEWS[x.dtype.name][1])


@st.composite
def scramble_cases(draw: st.DrawFn) -> dict:
    dtype = draw(st.sampled_from(["uint8", "float16", "bfloat16", "float32"]))
    use_torch = dtype == "bfloat16" or draw(st.booleans())
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    tile_h, tile_w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["NCHW", "NHWC"]))
    batched = draw(st.booleans())
    h, w = rows * tile_h, cols * tile_w
    shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    if not batched:
        shape = shape[1:]
    return {
        "x": random_images(shape, dtype, use_torch, draw(st.integers(0, 2**32 - 1))),
        "grid": (rows, cols) if rows != cols or draw(st.booleans()) else rows,
        "layout": layout,
        "seed": draw(st.integers(0, 2**64 - 1)),
        "derange": rows * cols > 1 and draw(st.booleans()),  # a single tile cannot be deranged
        "flips": draw(st.booleans()),
        "offset": draw(st.integers(0, 1000)),
    }


# ---------------------------------------------------------------- properties


@FAST
@given(scramble_cases())
def test_matches_reference_bit_for_bit(case: dict) -> None:
    x = case.pop("x")
    out, plan = scramble_grid(x, return_perm=True, **case)
    assert type(out) is type(x)
    assert out.dtype == x.dtype and tuple(out.shape) == tuple(x.shape)
    assert isinstance(plan, GridPlan) and type(plan.tiles) is type(x)
    expected = reference_scramble(x, plan.tiles, plan.transforms, case["layout"])
    np.testing.assert_array_equal(as_bits(out), as_bits(expected.numpy() if isinstance(x, np.ndarray) else expected))


@FAST
@given(scramble_cases())
def test_plan_is_valid_and_matches_grid_plan(case: dict) -> None:
    x = case.pop("x")
    _, plan = scramble_grid(x, return_perm=True, **case)
    tiles, codes = np.asarray(plan.tiles), np.asarray(plan.transforms)
    n = x.shape[0] if x.ndim == 4 else 1
    rows, cols = case["grid"] if isinstance(case["grid"], tuple) else (case["grid"],) * 2
    assert tiles.shape == codes.shape == (n, rows, cols)
    assert tiles.dtype == np.int64 and codes.dtype == np.uint8
    flat = tiles.reshape(n, -1)
    for perm in flat:
        assert sorted(perm) == list(range(rows * cols))
        if case["derange"] and rows * cols > 1:
            assert not np.any(perm == np.arange(rows * cols)), perm
    hw = x.shape[-3:-1] if case["layout"] == "NHWC" else x.shape[-2:]
    square = hw[0] // rows == hw[1] // cols
    assert codes.max() < (8 if square else 4)
    if not case["flips"]:
        assert not codes.any()
    again = grid_plan(n, case["grid"], hw, case["seed"], derange=case["derange"], flips=case["flips"], offset=case["offset"])
    np.testing.assert_array_equal(again.tiles, tiles)
    np.testing.assert_array_equal(again.transforms, codes)


@FAST
@given(scramble_cases())
def test_output_is_a_permutation_of_input_tiles(case: dict) -> None:
    x = case.pop("x")
    case["flips"] = False
    out = scramble_grid(x, **case)
    rows, cols = case["grid"] if isinstance(case["grid"], tuple) else (case["grid"],) * 2
    to_hwc = (lambda a: a) if case["layout"] == "NHWC" else (lambda a: np.moveaxis(a, -3, -1))
    x_bits, out_bits = to_hwc(as_bits(x)), to_hwc(as_bits(out))
    for src_image, out_image in zip(x_bits.reshape(-1, *x_bits.shape[-3:]), out_bits.reshape(-1, *out_bits.shape[-3:])):
        assert sorted(image_tiles(out_image, rows, cols)) == sorted(image_tiles(src_image, rows, cols))


@FAST
@given(scramble_cases())
def test_split_batch_with_offset_equals_one_call(case: dict) -> None:
    x = case.pop("x")
    if x.ndim == 3 or x.shape[0] < 2:
        x = x[None] if x.ndim == 3 else x
        x = torch.cat([x, x]) if isinstance(x, torch.Tensor) else np.concatenate([x, x])
    whole = scramble_grid(x, **case)
    first = scramble_grid(x[:1], **case)
    rest = scramble_grid(x[1:], **{**case, "offset": case["offset"] + 1})
    joined = torch.cat([first, rest]) if isinstance(x, torch.Tensor) else np.concatenate([first, rest])
    np.testing.assert_array_equal(as_bits(whole), as_bits(joined))


@pytest.mark.parametrize("use_torch", [False, True])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_grid_one_without_derange_is_a_copy(use_torch: bool, layout: str) -> None:
    x = random_images((2, 3, 6, 10), "float32", use_torch, seed=1)
    out, plan = scramble_grid(x, 1, seed=5, layout=layout, derange=False, flips=True, return_perm=True)
    np.testing.assert_array_equal(as_bits(out), as_bits(x))
    assert not np.asarray(plan.tiles).any() and not np.asarray(plan.transforms).any()


@pytest.mark.parametrize("grid", [1, (1, 1)])
def test_single_tile_grid_cannot_be_deranged(grid) -> None:
    x = random_images((2, 3, 6, 10), "uint8", False, seed=1)
    for call in (lambda: scramble_grid(x, grid, seed=5), lambda: grid_plan(2, grid, (6, 10), seed=5)):
        with check_error(GridError, "single tile", "cannot be moved") as raised:
            call()
        assert isinstance(raised.value, UserError) and isinstance(raised.value, ValueError)
        assert "\n" not in str(raised.value)
    # The native planner refuses it on its own (an exception, not the identity and not a panic).
    with check_error(ValueError, "single tile"):
        _native.grid_plan(2, 1, 1, True, 5, 0, True, False)


def test_two_tiles_are_always_swapped() -> None:
    plan = grid_plan(50, (1, 2), (4, 8), seed=0)
    assert (plan.tiles.reshape(50, 2) == [1, 0]).all()


@pytest.mark.parametrize("use_torch", [False, True])
def test_seed_determines_output(use_torch: bool) -> None:
    base = np.arange(2 * 3 * 16 * 16, dtype=np.float32).reshape(2, 3, 16, 16)  # all pixels distinct
    x = torch.from_numpy(base) if use_torch else base
    a = scramble_grid(x, 4, seed=0)
    np.testing.assert_array_equal(as_bits(a), as_bits(scramble_grid(x, 4, seed=0)))
    for other_seed in (1, 2, 2**63):
        assert not np.array_equal(as_bits(a), as_bits(scramble_grid(x, 4, seed=other_seed)))
    assert not np.array_equal(as_bits(a), as_bits(x))


def test_one_image_equals_batch_of_one() -> None:
    x = random_images((3, 8, 8), "uint8", False, seed=2)
    single, plan = scramble_grid(x, 2, seed=3, flips=True, return_perm=True)
    batch, batch_plan = scramble_grid(x[None], 2, seed=3, flips=True, return_perm=True)
    np.testing.assert_array_equal(single, batch[0])
    assert plan.tiles.shape == (1, 2, 2)
    np.testing.assert_array_equal(plan.tiles, batch_plan.tiles)


def test_does_not_modify_input_and_accepts_readonly_and_grad() -> None:
    x = random_images((1, 2, 4, 4), "float32", False, seed=3)
    before = x.copy()
    x.flags.writeable = False
    scramble_grid(x, 2, seed=0)
    np.testing.assert_array_equal(x, before)
    t = torch.rand(1, 2, 4, 4, requires_grad=True)
    assert scramble_grid(t, 2, seed=0).shape == t.shape


# ---------------------------------------------------------------- fused data prep


@FAST
@given(
    n=st.integers(1, 3),
    c=st.sampled_from([1, 3, 4]),
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    tile=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    dtype=st.sampled_from(["float32", "float16"]),
    use_torch=st.booleans(),
    batched=st.booleans(),
    flips=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_prepare_equals_reference_of_unit_range(n, c, rows, cols, tile, dtype, use_torch, batched, flips, seed, data_seed) -> None:
    shape = (n, rows * tile[0], cols * tile[1], c)
    x = random_images(shape if batched else shape[1:], "uint8", use_torch, data_seed)
    want_dtype = getattr(torch, dtype) if use_torch else np.dtype(dtype)
    out, plan = prepare_images(x, (rows, cols), seed, dtype=want_dtype, flips=flips, offset=7, return_perm=True)

    unit = torch.from_numpy(np.asarray(x)).double() / 255 * 2 - 1  # NHWC float64
    expected = reference_scramble(unit, plan.tiles, plan.transforms, layout="NHWC")
    expected = expected.permute(0, 3, 1, 2) if batched else expected.permute(2, 0, 1)
    expected = expected.float().to(getattr(torch, dtype))  # via float32, as documented
    assert type(out) is type(x) and out.dtype == want_dtype
    got = out if use_torch else torch.from_numpy(out)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    assert got.min() >= -1 and got.max() <= 1

    # Same plan as scrambling the bytes directly (a 1x1 grid is the conversion alone: nothing to derange).
    _, byte_plan = scramble_grid(x, (rows, cols), seed, layout="NHWC", derange=rows * cols > 1, flips=flips,
                                 offset=7, return_perm=True)
    np.testing.assert_array_equal(np.asarray(byte_plan.tiles), np.asarray(plan.tiles))


@pytest.mark.parametrize("flips", [False, True])
def test_prepare_with_grid_one_is_the_unscrambled_conversion(flips: bool) -> None:
    x = random_images((2, 6, 10, 3), "uint8", False, seed=4)
    out = prepare_images(x, 1, seed=9, flips=flips)
    expected = (np.moveaxis(x, -1, 1).astype(np.float64) * 2 / 255 - 1).astype(np.float32)
    np.testing.assert_array_equal(out, expected)


def test_prepare_endpoints() -> None:
    x = np.zeros((1, 4, 4, 3), np.uint8)
    x[0, :2] = 255
    out = prepare_images(x, 2, seed=0)
    assert set(np.unique(out)) == {-1.0, 1.0}


# ---------------------------------------------------------------- errors


@contextmanager
def check_error(exc_type: type[Exception], *fragments: str) -> Iterator[pytest.ExceptionInfo]:
    """Expect `exc_type` with a message naming every fragment."""
    with pytest.raises(exc_type) as info:
        yield info
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("use_torch", [False, True])
def test_size_not_divisible_by_grid(use_torch: bool) -> None:
    x = random_images((1, 3, 10, 8), "uint8", use_torch, 0)
    with check_error(ValueError, "10x8", "4x4", "not divisible"):
        scramble_grid(x, 4, seed=0)
    with check_error(ValueError, "10x8", "3x2", "not divisible"):
        grid_plan(1, (3, 2), (10, 8), seed=0)


@pytest.mark.parametrize("grid", [0, -1, (2, 0), (0, 3)])
def test_grid_below_one(grid) -> None:
    with check_error(ValueError, "at least 1x1"):
        scramble_grid(np.zeros((1, 1, 4, 4), np.uint8), grid, seed=0)


@pytest.mark.parametrize("grid", ["4", 2.0, (1, 2, 3), True, None])
def test_grid_wrong_type(grid) -> None:
    with check_error(TypeError, "grid"):
        scramble_grid(np.zeros((1, 1, 4, 4), np.uint8), grid, seed=0)


def test_grid_larger_than_image() -> None:
    with check_error(ValueError, "8x8", "larger", "4x4"):
        scramble_grid(np.zeros((1, 1, 4, 4), np.uint8), 8, seed=0)
    with check_error(ValueError, "larger"):
        prepare_images(np.zeros((4, 4, 3), np.uint8), (1, 5), seed=0)


@pytest.mark.parametrize("shape", [(4, 4), (1, 1, 1, 4, 4), (16,)])
def test_wrong_rank(shape) -> None:
    with check_error(ValueError, "3-D", str(shape)):
        scramble_grid(np.zeros(shape, np.uint8), 1, seed=0)
    with check_error(ValueError, "3-D"):
        prepare_images(torch.zeros(shape, dtype=torch.uint8), 1, seed=0)


def test_non_contiguous_is_refused_not_copied() -> None:
    x = np.zeros((1, 8, 8, 3), np.uint8).transpose(0, 3, 1, 2)
    with check_error(ValueError, "not C-contiguous", "(1, 3, 8, 8)"):
        scramble_grid(x, 2, seed=0)
    t = torch.zeros(1, 3, 8, 8).to(memory_format=torch.channels_last)
    with check_error(ValueError, "not C-contiguous", "NHWC"):
        scramble_grid(t, 2, seed=0)
    with check_error(ValueError, "not C-contiguous"):
        prepare_images(np.zeros((1, 8, 16, 3), np.uint8)[:, :, ::2], 2, seed=0)


def test_empty_batch() -> None:
    with check_error(ValueError, "empty batch", "(0, 3, 4, 4)"):
        scramble_grid(np.zeros((0, 3, 4, 4), np.float32), 2, seed=0)
    with check_error(ValueError, "empty batch"):
        prepare_images(torch.zeros((0, 4, 4, 3), dtype=torch.uint8), 2, seed=0)


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((1, 1, 4, 4), np.float64),
        np.zeros((1, 1, 4, 4), np.int32),
        torch.zeros((1, 1, 4, 4), dtype=torch.float64),
        torch.zeros((1, 1, 4, 4), dtype=torch.int64),
    ],
    ids=["np-float64", "np-int32", "torch-float64", "torch-int64"],
)
def test_unsupported_dtype(x) -> None:
    with check_error(TypeError, "unsupported dtype", str(x.dtype)):
        scramble_grid(x, 2, seed=0)


def test_unsupported_input_kind() -> None:
    with check_error(TypeError, "list"):
        scramble_grid([[[0]]], 1, seed=0)


def test_prepare_dtype_errors() -> None:
    with check_error(TypeError, "uint8", "float32"):
        prepare_images(np.zeros((4, 4, 3), np.float32), 2, seed=0)
    for bad in ("float64", np.int8, torch.bfloat16, "nope"):
        with check_error(TypeError, "float32 or float16"):
            prepare_images(np.zeros((4, 4, 3), np.uint8), 2, seed=0, dtype=bad)


def test_unknown_layout() -> None:
    with check_error(ValueError, "'CHWN'", "NCHW"):
        scramble_grid(np.zeros((1, 1, 4, 4), np.uint8), 2, seed=0, layout="CHWN")


def test_non_cpu_tensor() -> None:
    # No GPU here: a meta tensor exercises the same device check as CUDA.
    x = torch.empty((1, 3, 4, 4), device="meta")
    with check_error(ValueError, "meta", ".cpu()"):
        scramble_grid(x, 2, seed=0)
    with check_error(ValueError, ".cpu()"):
        prepare_images(torch.empty((4, 4, 3), dtype=torch.uint8, device="meta"), 2, seed=0)


def test_seed_and_offset_range() -> None:
    x = np.zeros((1, 1, 4, 4), np.uint8)
    with check_error(ValueError, "seed", "-1"):
        scramble_grid(x, 2, seed=-1)
    with check_error(ValueError, "offset"):
        scramble_grid(x, 2, seed=0, offset=2**64)
    with check_error(TypeError, "seed"):
        scramble_grid(x, 2, seed=1.5)
    # Stream index offset + (n - 1) must fit in 64 bits: checked natively.
    with check_error(ValueError, "overflows"):
        scramble_grid(np.zeros((2, 1, 4, 4), np.uint8), 2, seed=0, offset=2**64 - 1)


def test_native_layer_validates_on_its_own() -> None:
    """The Rust entry points reject bad input with exceptions, never panics."""
    x = np.zeros((1, 1, 4, 4), np.uint8)
    out = np.empty_like(x)
    ok_tiles = np.arange(4, dtype=np.int64).reshape(1, 2, 2)
    codes = np.zeros((1, 2, 2), np.uint8)
    _native.scramble_u8(x, out, False, ok_tiles, codes)
    with check_error(ValueError, "permutation"):
        _native.scramble_u8(x, out, False, np.array([[[0, 0], [1, 2]]]), codes)
    with check_error(ValueError, "permutation"):
        _native.scramble_u8(x, out, False, np.array([[[0, -1], [1, 2]]]), codes)
    with check_error(ValueError, "transform code"):
        _native.scramble_u8(x, out, False, ok_tiles, np.full((1, 2, 2), 9, np.uint8))
    with check_error(ValueError, "not divisible"):
        _native.scramble_u8(np.zeros((1, 1, 5, 4), np.uint8), np.empty((1, 1, 5, 4), np.uint8), False, ok_tiles, codes)
    with check_error(ValueError, "4-D"):
        _native.scramble_u8(x[0], out[0], False, ok_tiles, codes)
    with check_error(ValueError, "output shape"):
        _native.scramble_u8(x, np.empty((1, 1, 4, 8), np.uint8), False, ok_tiles, codes)
    with check_error(ValueError, "C-contiguous"):
        _native.scramble_u8(np.zeros((1, 1, 4, 8), np.uint8)[..., ::2], out, False, ok_tiles, codes)
    with check_error(ValueError, "plan"):
        _native.scramble_u8(np.zeros((2, 1, 4, 4), np.uint8), np.empty((2, 1, 4, 4), np.uint8), False, ok_tiles, codes)
    with check_error(ValueError, "NCHW shape"):
        _native.prepare_f32(np.zeros((1, 4, 4, 3), np.uint8), np.empty((1, 4, 4, 3), np.float32), ok_tiles, codes)
    with pytest.raises(TypeError):  # dtype mismatch is caught by the bindings
        _native.scramble_u16(x, out, False, ok_tiles, codes)


def test_huge_plan_is_an_exception_not_an_abort() -> None:
    """A plan too large to allocate raises in Python instead of aborting the interpreter (run in a child
    process, so that a regression fails this test rather than killing the test run)."""
    import subprocess
    import sys

    code = (
        "from dt_lora import _native, grid_plan\n"
        "for call in (lambda: grid_plan(10**12, 4, (64, 64), 0),\n"
        "             lambda: _native.grid_plan(10**12, 4, 4, True, 0, 0, True, False),\n"
        "             lambda: grid_plan(1, 20_000, (20_000, 20_000), 0)):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as error:\n"
        "        print('ValueError:', error)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    lines = child.stdout.splitlines()
    assert len(lines) == 3 and all("exceeds the limit" in line and "offset" in line for line in lines), lines
    # Below the bound nothing changed: splitting with offset still equals one call.
    whole = grid_plan(6, 4, (8, 8), 5)
    first, rest = grid_plan(2, 4, (8, 8), 5), grid_plan(4, 4, (8, 8), 5, offset=2)
    np.testing.assert_array_equal(whole.tiles, np.concatenate([first.tiles, rest.tiles]))


# ---------------------------------------------------------------- folders (what `dt-lora scramble` writes)


def read_back(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def four_tile_image() -> np.ndarray:
    """An 8x8 RGB image whose four 4x4 tiles are flat, distinct colours."""
    image = np.empty((8, 8, 3), np.uint8)
    for index, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        row, col = divmod(index, 2)
        image[row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] = colour
    return image


@pytest.fixture
def one_image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(four_tile_image()).save(folder / "tiles.png")
    return folder


@pytest.mark.parametrize("grid", [1, (1, 1)])
def test_folder_with_single_tile_grid_is_refused_before_writing(one_image_folder: Path, tmp_path: Path,
                                                                grid) -> None:
    out = tmp_path / "out"
    with check_error(GridError, "1x1", "single tile"):
        scramble_folder(one_image_folder, out, grid, seed=0, progress=False)
    assert not out.exists()


def test_cli_grid_one_exits_2_with_one_line(one_image_folder: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    from dt_lora.cli import main

    out = tmp_path / "out"
    assert main(["scramble", str(one_image_folder), str(out), "--grid", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "single tile" in err and "Traceback" not in err
    assert not out.exists()


def test_folder_with_single_tile_grid_without_derange_is_a_copy(one_image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    scramble_folder(one_image_folder, out, 1, seed=0, derange=False, progress=False)
    np.testing.assert_array_equal(read_back(out / "tiles.png"), four_tile_image())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folder_grid_two_leaves_no_tile_in_place(one_image_folder: Path, tmp_path: Path, seed: int) -> None:
    out = tmp_path / "out"
    scramble_folder(one_image_folder, out, 2, seed=seed, progress=False)
    source, scrambled = four_tile_image(), read_back(out / "tiles.png")
    source_tiles, scrambled_tiles = image_tiles(source, 2, 2), image_tiles(scrambled, 2, 2)
    assert sorted(scrambled_tiles) == sorted(source_tiles)
    assert all(a != b for a, b in zip(source_tiles, scrambled_tiles))


def test_folder_16_bit_grey_png_scrambles_its_8_bit_gradient(tmp_path: Path) -> None:
    gradient_8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(gradient_8.astype(np.uint16) * 257).save(folder / "grey16.png")  # mode I;16
    out = tmp_path / "out"
    scramble_folder(folder, out, 4, seed=3, progress=False)
    written = read_back(out / "grey16.png")
    assert written.dtype == np.uint8 and written.shape == (16, 16)  # 8-bit grey, as the input was grey
    expected = scramble_grid(np.ascontiguousarray(gradient_8[..., None]), 4, 3, layout="NHWC")[..., 0]
    np.testing.assert_array_equal(written, expected)


@pytest.mark.parametrize(
    "grid, fragments",
    [(16, ["grid 16x16 is larger than the 8x8 image", "tiles.png"]),
     ((1, 9), ["larger than the 8x8 image", "tiles.png"]),
     (3, ["8x8 is not divisible by the grid 3x3", "tiles.png"])],
)
def test_folder_grid_that_does_not_fit_names_the_file(one_image_folder: Path, tmp_path: Path, grid,
                                                     fragments: list[str]) -> None:
    with check_error(GridError, str(one_image_folder / "tiles.png"), *fragments) as raised:
        scramble_folder(one_image_folder, tmp_path / "out", grid, seed=0, progress=False)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()
