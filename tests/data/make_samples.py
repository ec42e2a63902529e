"""Draw the small sample scenes in tests/data/samples/ (README demo, CLI tests).

    python tests/data/make_samples.py

Seeded, so rerunning gives the same pictures (given the same Pillow).
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
OUT_DIR = Path(__file__).parent / "samples"


def sky_and_ground(draw: ImageDraw.ImageDraw, rng: random.Random, sky: tuple, ground: tuple) -> int:
    horizon = rng.randint(SIZE * 5 // 8, SIZE * 3 // 4)
    draw.rectangle([0, 0, SIZE, horizon], fill=sky)
    draw.rectangle([0, horizon, SIZE, SIZE], fill=ground)
    return horizon


def house(rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(im)
    horizon = sky_and_ground(d, rng, (135, 190, 235), (90, 160, 70))
    d.ellipse([96, 10, 118, 32], fill=(250, 210, 60))
    left, top = 30, horizon - 40
    d.rectangle([left, top, left + 50, horizon], fill=(200, 80, 60))
    d.polygon([(left - 6, top), (left + 25, top - 26), (left + 56, top)], fill=(110, 60, 40))
    d.rectangle([left + 20, horizon - 22, left + 30, horizon], fill=(80, 50, 30))
    d.rectangle([left + 6, top + 8, left + 16, top + 18], fill=(240, 240, 200))
    return im


def tree(rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(im)
    horizon = sky_and_ground(d, rng, (170, 210, 240), (120, 170, 80))
    d.rectangle([58, horizon - 40, 70, horizon + 4], fill=(100, 70, 40))
    for _ in range(6):
        x, y = rng.randint(36, 92), rng.randint(horizon - 80, horizon - 40)
        d.ellipse([x - 20, y - 18, x + 20, y + 18], fill=(40, rng.randint(110, 150), 50))
    return im


def boat(rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(im)
    horizon = sky_and_ground(d, rng, (200, 225, 245), (40, 90, 160))
    d.polygon([(30, horizon), (98, horizon), (86, horizon + 14), (42, horizon + 14)], fill=(150, 90, 50))
    d.line([(64, horizon), (64, horizon - 50)], fill=(60, 40, 20), width=3)
    d.polygon([(66, horizon - 48), (66, horizon - 6), (96, horizon - 6)], fill=(245, 245, 240))
    return im


def cat_face(rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), (245, 230, 200))
    d = ImageDraw.Draw(im)
    fur = (rng.randint(180, 230), rng.randint(110, 140), 60)
    d.polygon([(28, 50), (38, 14), (58, 40)], fill=fur)
    d.polygon([(100, 50), (90, 14), (70, 40)], fill=fur)
    d.ellipse([24, 30, 104, 110], fill=fur)
    d.ellipse([42, 56, 56, 70], fill=(40, 120, 60))
    d.ellipse([72, 56, 86, 70], fill=(40, 120, 60))
    d.polygon([(58, 80), (70, 80), (64, 88)], fill=(220, 120, 130))
    return im


def checker_and_ball(rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(im)
    step = 16
    for y in range(0, SIZE, step):
        for x in range(0, SIZE, step):
            shade = 230 if (x // step + y // step) % 2 else 70
            d.rectangle([x, y, x + step - 1, y + step - 1], fill=(shade, shade, shade))
    cx, cy = rng.randint(40, 88), rng.randint(40, 88)
    d.ellipse([cx - 26, cy - 26, cx + 26, cy + 26], fill=(220, 40, 40))
    return im


SCENES = {"house": house, "tree": tree, "boat": boat, "cat_face": cat_face, "checker_ball": checker_and_ball}


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, draw in SCENES.items():
        draw(rng).save(OUT_DIR / f"{name}.png", optimize=True)


if __name__ == "__main__":
    main()
