"""Tests for dt_lora.images: every Pillow mode and bit depth of a user's file to 8-bit pixels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dt_lora.errors import UserError
from dt_lora.images import ImageReadError, read_pixels, read_rgb

GRADIENT_8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
GRADIENT_16 = GRADIENT_8.astype(np.uint16) * 257  # k * 257 is the 16-bit value of 8-bit k (0 -> 0, 255 -> 65535)


def raw_png(path: Path, pixels: np.ndarray, bit_depth: int, colour_type: int) -> Path:
    """A PNG written chunk by chunk, for what Pillow cannot write (16-bit colour, 2-bit grey).

    `pixels` holds the packed samples of each row (big-endian for 16 bits), shape (height, row bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height = pixels.shape[0]
    width = {(16, 2): pixels.shape[1] // 6, (16, 6): pixels.shape[1] // 8, (2, 0): pixels.shape[1] * 4}[
        (bit_depth, colour_type)]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    rows = b"".join(b"\0" + row.tobytes() for row in pixels)  # filter type 0 on every row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def saved(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


# ---------------------------------------------------------------- bit depths


def test_16_bit_grey_png_becomes_the_matching_8_bit_gradient(tmp_path: Path) -> None:
    path = saved(tmp_path / "grey16.png", Image.fromarray(GRADIENT_16))
    with Image.open(path) as image:
        assert image.mode == "I;16"  # what the file is, so that this test tests the mode it names
    pixels = read_pixels(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 1)
    np.testing.assert_array_equal(pixels[..., 0], GRADIENT_8)
    np.testing.assert_array_equal(read_rgb(path), np.repeat(GRADIENT_8[..., None], 3, axis=-1))


def test_16_bit_values_keep_their_top_8_bits(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 32767, 32768, 65279, 65280, 65535]], dtype=np.uint16)
    path = saved(tmp_path / "grey16.png", Image.fromarray(values))
    np.testing.assert_array_equal(read_pixels(path)[..., 0], [[0, 0, 1, 127, 128, 254, 255, 255]])


def test_big_endian_16_bit_grey(tmp_path: Path) -> None:
    path = saved(tmp_path / "grey16b.tif", Image.fromarray(GRADIENT_16.astype(">u2")))
    with Image.open(path) as image:
        assert image.mode == "I;16B"
    np.testing.assert_array_equal(read_pixels(path)[..., 0], GRADIENT_8)


def test_32_bit_integer_grey_scales_by_the_files_bit_depth(tmp_path: Path) -> None:
    # Pillow writes mode I as signed 32-bit TIFF: full scale 2**31 - 1, so k << 23 is 8-bit k
    values = GRADIENT_8.astype(np.int32) << 23
    path = saved(tmp_path / "grey32.tif", Image.fromarray(values))
    with Image.open(path) as image:
        assert image.mode == "I"
    np.testing.assert_array_equal(read_pixels(path)[..., 0], GRADIENT_8)


def tiff_12_bit(path: Path, values: np.ndarray) -> Path:
    """An uncompressed 12-bit grey TIFF (Pillow cannot write one): two samples in three bytes."""
    height, width = values.shape
    data = bytearray()
    for a, b in values.reshape(-1, 2).tolist():
        data += bytes([a >> 4, (a & 15) << 4 | b >> 8, b & 255])
    tags = [(256, 3, width), (257, 3, height), (258, 3, 12), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
            (278, 3, height), (279, 4, len(data))]  # size, BitsPerSample 12, no compression, black is 0, one strip
    directory = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value)
                                                         for tag, kind, value in tags) + struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8 + len(data)) + bytes(data) + directory)
    return path


def test_12_bit_tiff_scales_by_its_own_depth_not_its_16_bit_container(tmp_path: Path) -> None:
    values = (GRADIENT_8.astype(np.int64) << 4) | 15  # 8-bit k with 4 low bits set: 12-bit k.f
    path = tiff_12_bit(tmp_path / "grey12.tif", values)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # Pillow's container for it: 16 bits would make it 16x too dark
    np.testing.assert_array_equal(read_pixels(path)[..., 0], GRADIENT_8)


def test_negative_32_bit_grey_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path / "signed.tif", Image.fromarray(np.array([[-5, 7]], dtype=np.int32)))
    with pytest.raises(ImageReadError, match=r"signed\.tif: .*-5 to 7, outside 0\.\.2147483647"):
        read_pixels(path)


def test_2_bit_grey_png_spans_0_to_255(tmp_path: Path) -> None:
    path = raw_png(tmp_path / "grey2.png", np.array([[0b00011011]], dtype=np.uint8), 2, 0)
    np.testing.assert_array_equal(read_pixels(path)[..., 0], [[0, 85, 170, 255]])


def test_16_bit_rgb_and_rgba_pngs_keep_their_high_bytes(tmp_path: Path) -> None:
    rgb = np.array([[[0x1234, 0xFF80, 0x0080], [0xFFFF, 0x0000, 0x8000]]], dtype=">u2")
    path = raw_png(tmp_path / "rgb16.png", rgb.view(np.uint8).reshape(1, -1), 16, 2)
    np.testing.assert_array_equal(read_pixels(path), [[[0x12, 0xFF, 0x00], [0xFF, 0x00, 0x80]]])
    rgba = np.array([[[0xFFFF, 0x0000, 0x0000, 0x0000], [0x0000, 0x0000, 0xFFFF, 0x8000]]], dtype=">u2")
    path = raw_png(tmp_path / "rgba16.png", rgba.view(np.uint8).reshape(1, -1), 16, 6)
    np.testing.assert_array_equal(read_pixels(path), [[[255, 0, 0, 0], [0, 0, 255, 128]]])
    # composited onto white: transparent red is white, half-transparent blue is light blue
    np.testing.assert_array_equal(read_rgb(path), [[[255, 255, 255], [127, 127, 255]]])


def test_float_grey_is_refused_naming_the_file_and_mode(tmp_path: Path) -> None:
    path = saved(tmp_path / "float.tif", Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)))
    with pytest.raises(ImageReadError, match=r"float\.tif: .*mode F") as info:
        read_rgb(path)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- modes


def test_1_bit_is_black_and_white(tmp_path: Path) -> None:
    image = Image.new("1", (3, 1))
    image.putpixel((1, 0), 1)
    np.testing.assert_array_equal(read_rgb(saved(tmp_path / "bits.png", image))[..., 0], [[0, 255, 0]])


def test_grey_with_alpha_is_kept_or_composited_onto_white(tmp_path: Path) -> None:
    la = np.array([[[0, 255], [0, 0], [100, 128], [200, 51]]], dtype=np.uint8)
    path = saved(tmp_path / "la.png", Image.fromarray(la, mode="LA"))
    np.testing.assert_array_equal(read_pixels(path), la)
    # round(g * a / 255 + 255 * (1 - a / 255))
    expected = [0, 255, round(100 * 128 / 255 + 255 * 127 / 255), round(200 * 51 / 255 + 255 * 204 / 255)]
    np.testing.assert_array_equal(read_rgb(path), np.repeat(np.array([expected], np.uint8)[..., None], 3, axis=-1))


def test_rgba_transparent_black_is_white(tmp_path: Path) -> None:
    rgba = np.array([[[0, 0, 0, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    path = saved(tmp_path / "rgba.png", Image.fromarray(rgba))
    np.testing.assert_array_equal(read_pixels(path), rgba)
    np.testing.assert_array_equal(read_rgb(path), [[[255, 255, 255], [10, 20, 30]]])


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    for x in range(3):
        image.putpixel((x, 0), x)
    plain = saved(tmp_path / "plain.png", image)
    np.testing.assert_array_equal(read_pixels(plain), [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])
    see_through = saved(tmp_path / "trns.png", image, transparency=1)  # palette entry 1 (green) is transparent
    np.testing.assert_array_equal(read_pixels(see_through)[..., 3], [[255, 0, 255]])
    np.testing.assert_array_equal(read_rgb(see_through), [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]])


def test_transparent_colour_of_grey_and_rgb_becomes_alpha(tmp_path: Path) -> None:
    grey = saved(tmp_path / "grey.png", Image.fromarray(np.array([[0, 9, 200]], np.uint8)), transparency=9)
    np.testing.assert_array_equal(read_pixels(grey), [[[0, 255], [9, 0], [200, 255]]])
    grey16 = saved(tmp_path / "grey16.png", Image.fromarray(np.array([[0, 1000, 65535]], np.uint16)),
                   transparency=1000)
    np.testing.assert_array_equal(read_pixels(grey16), [[[0, 255], [3, 0], [255, 255]]])
    rgb = saved(tmp_path / "rgb.png", Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)),
                transparency=(4, 5, 6))
    np.testing.assert_array_equal(read_rgb(rgb), [[[1, 2, 3], [255, 255, 255]]])


def test_cmyk_and_ycbcr_become_rgb(tmp_path: Path) -> None:
    cmyk = saved(tmp_path / "cmyk.tif", Image.new("CMYK", (2, 1), (0, 255, 0, 0)))
    np.testing.assert_array_equal(read_rgb(cmyk), [[[255, 0, 255]] * 2])
    ycbcr = saved(tmp_path / "ycbcr.tif", Image.new("YCbCr", (2, 1), (100, 128, 128)))
    np.testing.assert_array_equal(read_rgb(ycbcr), [[[100, 100, 100]] * 2])


def test_unsupported_mode_is_one_line_naming_file_and_mode(tmp_path: Path) -> None:
    path = saved(tmp_path / "lab.tif", Image.new("LAB", (2, 2), (50, 0, 0)))
    with pytest.raises(ImageReadError, match=r"cannot read image .*lab\.tif: its pixel mode LAB is not supported"):
        read_rgb(path)


# ---------------------------------------------------------------- orientation and frames


@pytest.mark.parametrize(
    "orientation, upright",
    [
        (1, lambda a: a),
        (2, np.fliplr),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored turned left: turn it right
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_turns_photos_upright(tmp_path: Path, orientation: int, upright) -> None:
    stored = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    path = saved(tmp_path / "photo.png", Image.fromarray(stored), exif=exif)
    np.testing.assert_array_equal(read_pixels(path)[..., 0], upright(stored))


def test_exif_orientation_of_16_bit_grey(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = saved(tmp_path / "grey16.png", Image.fromarray(GRADIENT_16[:4]), exif=exif)
    np.testing.assert_array_equal(read_pixels(path)[..., 0], np.rot90(GRADIENT_8[:4], -1))


def test_damaged_exif_is_refused_not_guessed(tmp_path: Path) -> None:
    whole = saved(tmp_path / "whole.png", Image.new("L", (3, 2))).read_bytes()
    exif = b"eXIf" + b"garbage"
    chunk = struct.pack(">I", 7) + exif + struct.pack(">I", zlib.crc32(exif))
    at = whole.index(b"IDAT") - 4
    path = tmp_path / "bad_exif.png"
    path.write_bytes(whole[:at] + chunk + whole[at:])
    with pytest.raises(ImageReadError, match=r"bad_exif\.png: its EXIF block, which says which way up it is, is damaged"):
        read_rgb(path)


def test_animation_is_refused(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ("red", "blue")]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageReadError, match=r"anim\.png: it has 2 frames"):
        read_rgb(path)


def test_mpo_jpeg_gives_its_primary_photo(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    path = tmp_path / "camera.jpg"
    frames[0].save(path, format="MPO", save_all=True, append_images=frames[1:])
    pixels = read_rgb(path).astype(int)
    assert np.all(np.abs(pixels - [255, 0, 0]) <= 2)  # JPEG: red within rounding


# ---------------------------------------------------------------- damaged files


def test_damaged_and_truncated_files_are_one_line_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"cannot read image .*junk\.png: not a readable image"):
        read_rgb(junk)
    whole = saved(tmp_path / "whole.png", Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3),
                                                                                             dtype=np.uint8)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(ImageReadError, match=r"truncated\.png: not a readable image") as info:
        read_rgb(truncated)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- every reader uses it


def test_recipe_image_folder_reads_16_bit_grey(tmp_path: Path) -> None:
    from dt_lora.data import load_image_folder

    saved(tmp_path / "grey16.png", Image.fromarray(GRADIENT_16))
    images = load_image_folder(tmp_path, 16)  # the image's own size: no resampling
    np.testing.assert_array_equal(images, np.repeat(GRADIENT_8[None, ..., None], 3, axis=-1))


def test_metric_reference_images_read_16_bit_grey(tmp_path: Path) -> None:
    from dt_lora.evaluate.metrics import _folder_batches

    path = saved(tmp_path / "grey16.png", Image.fromarray(GRADIENT_16))
    (batch,) = list(_folder_batches([path], (16, 16), 4))
    np.testing.assert_array_equal(batch, np.repeat(GRADIENT_8[None, ..., None], 3, axis=-1))
