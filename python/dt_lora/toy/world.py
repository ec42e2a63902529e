"""The toy world: seeded 32×32 renders of coloured shapes and the prompts that describe them.

Everything here is plain numpy and deterministic for a given seed, so the toy model can be rebuilt
bit for bit and the evaluator's training data regenerated on demand. `location_map` is the toy
ControlNet's conditioning image: where the object is and how big, nothing about what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple")
COLOUR_RGB = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.72, 0.15),
    "blue": (0.12, 0.28, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.60, 0.15, 0.80),
}

# Templates the model is trained on, and paraphrases it never sees: the held-out ones measure
# whether a shield generalises beyond the exact prompts it was trained with.
TRAIN_TEMPLATES = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a drawing of a {colour} {shape}",
    "an image of a {colour} {shape}",
    "{colour} {shape}",
)
HELDOUT_TEMPLATES = (
    "a picture showing a {colour} {shape}",
    "there is a {colour} {shape} here",
)
# Prompts naming one attribute only, so that single words carry meaning in the text encoder.
SHAPE_ONLY_TEMPLATES = ("a {shape}", "a photo of a {shape}")
COLOUR_ONLY_TEMPLATES = ("a {colour} shape", "something {colour}")

_SUPERSAMPLE = 4
# The location map's blob: its sigma in units of the scene's radius.
LOCATION_SIGMA = 0.5


@dataclass(frozen=True)
class Scene:
    """What one render shows; the labels the evaluator learns and reports."""

    shape: str
    colour: str
    background: float
    centre: tuple[float, float]
    radius: float
    angle: float


def prompt_for(shape: str, colour: str, template: str) -> str:
    return template.format(shape=shape, colour=colour)


def polygon_mask(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for every sample point at once."""
    inside = np.zeros(xs.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y1 > ys) != (y0 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x0 - x1) * (ys - y1) / (y0 - y1) + x1
        inside ^= crosses & (xs < x_at)
        x0, y0 = x1, y1
    return inside


def regular_polygon(n: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, radius: float) -> np.ndarray:
    """Mask of `shape` centred at the origin, in the coordinates xs, ys (y grows downwards)."""
    if shape == "circle":
        return xs**2 + ys**2 <= radius**2
    if shape == "square":
        half = 0.8 * radius
        return (np.abs(xs) <= half) & (np.abs(ys) <= half)
    if shape == "triangle":
        # apex up: vertices at -90°, 30°, 150° in image coordinates
        return polygon_mask(xs, ys, regular_polygon(3, radius * 1.05, -np.pi / 2))
    if shape == "cross":
        arm = 0.32 * radius
        return ((np.abs(xs) <= arm) & (np.abs(ys) <= radius)) | (
            (np.abs(ys) <= arm) & (np.abs(xs) <= radius)
        )
    if shape == "star":
        outer = regular_polygon(5, radius * 1.1, -np.pi / 2)
        inner = regular_polygon(5, radius * 0.45, -np.pi / 2 + np.pi / 5)
        vertices = np.empty((10, 2))
        vertices[0::2], vertices[1::2] = outer, inner
        return polygon_mask(xs, ys, vertices)
    raise ValueError(f"unknown shape {shape!r}; the toy world has {', '.join(SHAPES)}")


def random_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None) -> Scene:
    shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
    colour = colour if colour is not None else COLOURS[rng.integers(len(COLOURS))]
    radius = float(rng.uniform(7.0, 12.0))
    margin = radius + 1.5
    centre = (float(rng.uniform(margin, IMAGE_SIZE - margin)), float(rng.uniform(margin, IMAGE_SIZE - margin)))
    # circles have no orientation; the others turn a little, never so far that a square reads as a diamond
    angle = 0.0 if shape == "circle" else float(rng.uniform(-0.25, 0.25))
    background = float(rng.uniform(0.08, 0.6))
    return Scene(shape, colour, background, centre, radius, angle)


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render a scene to a uint8 HWC image, anti-aliased by supersampling."""
    n = IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    ys, xs = np.meshgrid(coords - scene.centre[1], coords - scene.centre[0], indexing="ij")
    cos, sin = np.cos(scene.angle), np.sin(scene.angle)
    xr, yr = cos * xs + sin * ys, -sin * xs + cos * ys
    mask = _shape_mask(scene.shape, xr, yr, scene.radius).astype(np.float32)
    coverage = mask.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))

    colour = np.asarray(COLOUR_RGB[scene.colour], dtype=np.float32)
    if rng is not None:
        colour = np.clip(colour + rng.normal(0, 0.03, 3), 0, 1)
    image = scene.background + coverage[..., None] * (colour - scene.background)
    if rng is not None:
        image = image + rng.normal(0, 0.015, image.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def sample(
    n: int,
    seed: int,
    *,
    shape: str | None = None,
    colour: str | None = None,
) -> tuple[np.ndarray, list[Scene]]:
    """`n` random renders (uint8 NHWC) and their scenes; `shape`/`colour` pin that attribute."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, shape, colour) for _ in range(n)]
    images = np.stack([render(scene, rng) for scene in scenes])
    return images, scenes


def location_maps(centres, radii) -> np.ndarray:
    """Soft white blobs on black (uint8 NHWC, three equal channels) at `centres`, sigma ∝ `radii`.

    A Gaussian has no corners and no colour, so the map tells a ControlNet where and how big the
    object is but nothing about its shape or colour: those must still come from the prompt.
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    sigma = LOCATION_SIGMA * np.asarray(radii, dtype=np.float64).reshape(-1, 1, 1)
    coords = np.arange(IMAGE_SIZE) + 0.5  # pixel centres, the coordinates `render` places shapes in
    dx = coords[None, None, :] - centres[:, 0, None, None]
    dy = coords[None, :, None] - centres[:, 1, None, None]
    blob = np.exp(-(dx**2 + dy**2) / (2 * sigma**2))
    gray = np.clip(np.rint(blob * 255), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def location_map(scene: Scene) -> np.ndarray:
    """The location map (uint8 HWC) of one scene: its centre and radius only."""
    return location_maps([scene.centre], [scene.radius])[0]


def training_prompt(scene: Scene, rng: np.random.Generator) -> str:
    """A prompt for a render, drawn from the training templates (mostly) or one-attribute ones."""
    u = rng.random()
    if u < 0.08:
        template = SHAPE_ONLY_TEMPLATES[rng.integers(len(SHAPE_ONLY_TEMPLATES))]
    elif u < 0.16:
        template = COLOUR_ONLY_TEMPLATES[rng.integers(len(COLOUR_ONLY_TEMPLATES))]
    else:
        template = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]
    return prompt_for(scene.shape, scene.colour, template)
