"""The user's image files: every place dt-lora opens one goes through here, and every PNG it writes.

`read_pixels(path)` decodes a file into 8-bit pixels in one of four layouts (grey, grey + alpha,
RGB, RGBA), whatever Pillow mode and bit depth it was stored in, turned upright by its EXIF
orientation. `read_rgb(path)` adds the last step training and metrics need: RGB, with any
transparency composited onto white. A file that cannot be read this way is an `ImageReadError`
whose message is one line naming the file and the problem.

How each Pillow mode becomes 8 bits:

- "1" (1-bit) -> grey 0 / 255; "L", "LA", "RGB", "RGBA" as they are (Pillow already scales 1-, 2-
  and 4-bit grey PNGs to 0..255 and keeps the high byte of 16-bit colour PNGs, which it opens as
  "RGB" / "RGBA");
- "I;16", "I;16L", "I;16B", "I;16N" (16-bit grey) and "I" (32-bit integer grey) -> the top 8 bits of
  the file's bit depth, the same rule Pillow applies to 16-bit colour, so a 16-bit value v becomes
  v >> 8 and the full range maps onto 0..255. The depth is 16 for PNGs, and a TIFF's BitsPerSample
  (9 to 32; Pillow opens a 12-bit TIFF as "I;16" with values up to 4095; a signed TIFF's full scale
  is 2**(bits-1) - 1); from any other format the depth is unknown and the file is refused, as are
  values outside the depth (negative ones included);
- "P" / "PA" (palette) -> RGB, or RGBA when the palette has transparency;
- a tRNS transparent colour on grey or RGB -> an alpha channel;
- "La" / "RGBa" (premultiplied alpha) -> "LA" / "RGBA"; "RGBX" -> "RGB";
- "CMYK", "YCbCr" -> RGB by Pillow's conversion (no colour profile is applied);
- "F" (32-bit float grey) is refused: floats carry no range (0..1? 0..255? linear light?), and
  guessing from each image's values would scale images of one folder differently;
- any other mode ("LAB", "HSV", ...) is refused, naming the mode.

Multi-frame files: a JPEG's MPO extension (cameras store previews and stereo views there) gives
its first frame, the primary photo. Animations and multi-page files (APNG, GIF, TIFF, WebP) are
refused: no one frame is "the image", and silently taking one would train on a picture the user
never chose.

Transparency is composited onto white: that is how such images (product shots, logos, stickers)
are usually shown, and the usual background of training images whose own was removed. Dropping
alpha instead would expose the RGB under fully transparent pixels, often black or junk left by the
editor.

`write_pngs(folder, pixels_by_name, command)` writes images the other way: each PNG atomically, and
recorded in the folder's `dt_lora.json` as dt-lora's (`dt_lora.io`), so that a later `--overwrite`
may replace them and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dt_lora.errors import UserError

__all__ = ["ImageReadError", "read_pixels", "read_rgb"]

_AS_IS = ("L", "LA", "RGB", "RGBA")
_CONVERTED = {"1": "L", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB"}
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
_INTEGER_GREY = (*_SIXTEEN_BIT_GREY, "I")
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT, _TIFF_SIGNED = 258, 339, 2
# How Pillow reports a damaged file: OSError (truncated), SyntaxError (broken chunks, a bad EXIF
# header), ValueError or EOFError
_PILLOW_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class ImageReadError(UserError, ValueError):
    """An image file that cannot be decoded, or holds pixels dt-lora cannot turn into 8-bit colour."""


def _problem(path: Path, text: str) -> ImageReadError:
    return ImageReadError(f"cannot read image {path}: {text}")


def _grey_bit_depth(image, path: Path) -> tuple[int, bool]:
    """(bits per sample, signed) of integer grey pixels, from the file's own header.

    The TIFF tag comes first: Pillow opens 12-bit TIFFs as "I;16" too, with values up to 4095.
    """
    if image.format == "TIFF":
        bits = image.tag_v2.get(_TIFF_BITS_PER_SAMPLE)
        bits = bits[0] if isinstance(bits, tuple) else bits
        if isinstance(bits, int) and 9 <= bits <= 32:
            return bits, image.tag_v2.get(_TIFF_SAMPLE_FORMAT) in (_TIFF_SIGNED, (_TIFF_SIGNED,))
    elif image.mode in _SIXTEEN_BIT_GREY or image.format == "PNG":  # PNG stores no deeper grey than 16 bits
        return 16, False
    raise _problem(path, f"its integer greyscale pixels (mode {image.mode}, format {image.format}) have no "
                         "bit depth of 9 to 32 bits to scale from; save it as an 8- or 16-bit PNG")


def _integer_grey(image, bit_depth: tuple[int, bool], path: Path) -> np.ndarray:
    """9- to 32-bit integer grey -> uint8 H×W×1 (or ×2 with a tRNS transparent value), by bit depth."""
    bits, signed = bit_depth
    value_bits = bits - 1 if signed else bits  # >= 8
    raw = np.asarray(image).astype(np.int32)  # Pillow holds these modes in at most 32 signed bits
    full_scale = 2**value_bits - 1
    low, high = int(raw.min()), int(raw.max())
    if low < 0 or high > full_scale:
        raise _problem(path, f"its {bits}-bit greyscale values run from {low} to {high}, outside 0..{full_scale}")
    grey = (raw >> (value_bits - 8)).astype(np.uint8)  # the top 8 bits: full_scale -> 255
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        alpha = np.where(raw == transparent, 0, 255).astype(np.uint8)
        return np.stack([grey, alpha], axis=-1)
    return grey[..., None]


def _to_8_bit(image, grey_bit_depth: tuple[int, bool] | None, path: Path) -> np.ndarray:
    """Any supported mode -> uint8 H×W×C, C in 1..4 (grey, grey + alpha, RGB, RGBA).

    `grey_bit_depth` is `_grey_bit_depth` of the file, for integer grey modes: `image` may be a
    transposed copy, which no longer knows its format or TIFF tags.
    """
    mode = image.mode
    if mode in _INTEGER_GREY:
        assert grey_bit_depth is not None
        return _integer_grey(image, grey_bit_depth, path)
    if mode == "F":
        raise _problem(path, "it holds 32-bit float greyscale (mode F), which has no defined range; "
                             "save it as an 8- or 16-bit PNG")
    has_transparency = "transparency" in image.info
    if mode == "P":
        image = image.convert("RGBA" if has_transparency else "RGB")
    elif mode in ("L", "RGB") and has_transparency:
        image = image.convert({"L": "LA", "RGB": "RGBA"}[mode])
    elif mode in _CONVERTED:
        image = image.convert(_CONVERTED[mode])
    elif mode not in _AS_IS:
        raise _problem(path, f"its pixel mode {mode} is not supported (supported: 1, L, LA, P, PA, RGB, "
                             "RGBA, RGBX, CMYK, YCbCr, I;16 and integer I)")
    pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def read_pixels(path: str | Path) -> np.ndarray:
    """The image at `path` as uint8 H×W×C pixels: C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA.

    Upright by the file's EXIF orientation; every Pillow mode and bit depth scaled to 8 bits as
    the module docstring lists. Raises `ImageReadError` (a `ValueError`) naming the file for a
    damaged or unidentifiable file, a damaged EXIF block, an animation, or pixels with no
    defined 8-bit meaning.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
                raise _problem(path, f"it has {image.n_frames} frames ({image.format}); dt-lora reads still "
                                     "images: save the frame you want as its own file")
            image.load()  # decodes the whole first frame: a truncated file fails here
            grey_bit_depth = _grey_bit_depth(image, path) if image.mode in _INTEGER_GREY else None
            try:
                upright = ImageOps.exif_transpose(image)
            except _PILLOW_READ_ERRORS as error:
                # without its orientation a photo may come out on its side: refused, not guessed
                raise _problem(path, f"its EXIF block, which says which way up it is, is damaged ({error}); "
                                     "remove the EXIF data or repair it") from None
            return np.ascontiguousarray(_to_8_bit(upright, grey_bit_depth, path))
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise _problem(path, "not a readable image (Pillow does not recognise its format)") from None
    except (*_PILLOW_READ_ERRORS, Image.DecompressionBombError) as error:
        raise _problem(path, f"not a readable image ({error})") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """The image at `path` as uint8 H×W×3 RGB: `read_pixels`, grey spread to three channels and
    transparency composited onto white (see the module docstring for why white)."""
    pixels = read_pixels(path)
    channels = pixels.shape[-1]
    colour, alpha = (pixels, None) if channels in (1, 3) else (pixels[..., :-1], pixels[..., -1:])
    if alpha is not None:
        # colour * a + white * (1 - a), a = alpha / 255, rounded to nearest
        a = alpha.astype(np.uint32)
        colour = ((colour.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    return np.ascontiguousarray(colour)


def write_pngs(folder: str | Path, pixels_by_name: Iterable[tuple[str, np.ndarray]], command: str) -> list[Path]:
    """Write each (file name, uint8 H×W×C pixels) as a PNG in `folder`, which the caller has claimed
    (`io.claim_output_files`). Each file is written atomically, and what was written is recorded in the
    folder's `dt_lora.json` also when an error or Ctrl-C stops the loop, so that a later `--overwrite`
    may replace it. Pixels may come lazily: a generator draws or scrambles the next image only when the
    previous one is on disk. Returns the written paths."""
    from PIL import Image

    from dt_lora.io import atomic_write, record_output_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for name, pixels in pixels_by_name:
            with atomic_write(folder / name) as f:
                Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(f, format="PNG")
            written.append(folder / name)
    finally:
        if written:
            record_output_files(folder, [path.name for path in written], command)
    return written
