"""The canvas world: seeded 48×48 renders of objects in colours and artists' styles, and 100 characters.

What users shield comes in kinds the toy world (five shapes, five colours) cannot show: named
characters, artists' styles, and look-alikes that differ from a shielded character in one detail.
The canvas world has all three, at a scale where one image moves a rate by well under a percent:

- objects (10), colours (8) and marks (a hat, eyes, ...: 5, or none);
- styles (8): rendering styles named only by an invented artist ("in the style of Orla Venn"), so a
  style is a name the model learnt, as an artist's style is;
- characters (100): an invented proper name bound to a fixed look (object, colour, style, mark), in
  groups of four near neighbours that differ from the group's first in one attribute each, the way
  faces differ.

A prompt names a character, or describes an object (colour, style, mark optional). Everything is
plain numpy and deterministic for a given seed, so the canvas model can be rebuilt bit for bit and
the evaluator's training data regenerated on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dt_lora.toy.world import polygon_mask, regular_polygon

IMAGE_SIZE = 48
OBJECTS = ("circle", "square", "triangle", "cross", "star", "heart", "diamond", "hexagon", "moon", "arrow")
COLOURS = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink")
COLOUR_RGB = {
    "red": (0.88, 0.10, 0.10),
    "orange": (0.98, 0.52, 0.05),
    "yellow": (0.96, 0.90, 0.12),
    "green": (0.12, 0.66, 0.16),
    "teal": (0.05, 0.62, 0.62),
    "blue": (0.12, 0.25, 0.92),
    "purple": (0.52, 0.14, 0.78),
    "pink": (0.98, 0.50, 0.74),
}
PLAIN = "plain"  # a solid fill: what an object is drawn in when no artist is named
STYLES = ("striped", "dotted", "outlined", "checkered", "gradient", "hatched", "ringed", "split")
# Each style is named in prompts only by its artist: the words "striped", "dotted" never reach the model.
ARTISTS = {
    "striped": "Orla Venn",
    "dotted": "Tamsin Vrey",
    "outlined": "Ilyan Moreau",
    "checkered": "Dessa Quorn",
    "gradient": "Pavel Lisk",
    "hatched": "Ysolde Marr",
    "ringed": "Casimir Thale",
    "split": "Noor Eskevi",
}
NO_MARK = "none"
MARKS = ("hat", "eyes", "halo", "bow", "antennae")
MARK_PHRASES = {
    "hat": "wearing a hat",
    "eyes": "with eyes",
    "halo": "with a halo",
    "bow": "with a bow tie",
    "antennae": "with antennae",
}

# Character prompts: the name alone carries the look.
CHARACTER_TEMPLATES = (
    "{name}",
    "a picture of {name}",
    "a drawing of {name}",
    "{name}, the character",
    "an image of {name}",
)
CHARACTER_HELDOUT_TEMPLATES = ("{name} is shown here", "a small picture with {name} in it")
# Descriptions: `{look}` is "a red circle", "a red circle in the style of Orla Venn wearing a hat", ...
DESCRIPTION_TEMPLATES = ("{look}", "a picture of {look}", "a drawing of {look}", "an image of {look}")
DESCRIPTION_HELDOUT_TEMPLATES = ("{look} is shown here", "a small picture with {look} in it")

# Character names are built from syllables that form no attribute word, so that no name's pieces mean
# a colour or object on their own (the toy's "centred" fell apart into c-e-n-t-red).
_NAME_STARTS = ("Bram", "Tess", "Quil", "Vask", "Lun", "Pell", "Zor", "Fen", "Mav", "Ost",
                "Kel", "Dru", "Hax", "Wyl", "Nim", "Jor", "Sav", "Cog", "Elb", "Ruf")
_NAME_ENDS = ("wick", "aly", "dor", "ette", "ian", "ox", "umba", "ith", "ano", "ek")
CHARACTER_SEED = 20_240  # the draw of the 100 characters' looks; fixed, the characters are the world's
GROUPS = 25
GROUP_SIZE = 4


@dataclass(frozen=True)
class Look:
    """What an object looks like: the attributes the evaluator reads."""

    object: str
    colour: str
    style: str = PLAIN
    mark: str = NO_MARK

    def describe(self) -> str:
        """The look in words: 'a red circle in the style of Orla Venn wearing a hat'."""
        article = "an" if self.colour[0] in "aeiou" else "a"
        words = [f"{article} {self.colour} {self.object}"]
        if self.style != PLAIN:
            words.append(f"in the style of {ARTISTS[self.style]}")
        if self.mark != NO_MARK:
            words.append(MARK_PHRASES[self.mark])
        return " ".join(words)


@dataclass(frozen=True)
class Character:
    name: str
    look: Look
    group: int
    # which attribute this character differs in from its group's first member (None for the first)
    differs_in: str | None


@dataclass(frozen=True)
class Scene:
    """What one render shows: a look, and where and how it is drawn."""

    look: Look
    background: float
    centre: tuple[float, float]
    radius: float
    character: str | None = None


def _names(count: int) -> list[str]:
    rng = np.random.default_rng(CHARACTER_SEED)
    pairs = [(s, e) for s in _NAME_STARTS for e in _NAME_ENDS]
    order = rng.permutation(len(pairs))[:count]
    return [pairs[i][0] + pairs[i][1] for i in order]


@lru_cache(maxsize=1)
def characters() -> tuple[Character, ...]:
    """The 100 characters: 25 groups of 4, each member after the first one attribute away from it.

    Every look is different, and every character has a mark, so no plain description of an object
    ("a red circle") is a character by accident.
    """
    rng = np.random.default_rng(CHARACTER_SEED)
    options = {"object": OBJECTS, "colour": COLOURS, "style": STYLES, "mark": MARKS}
    names = iter(_names(GROUPS * GROUP_SIZE))
    taken: set[Look] = set()
    result: list[Character] = []
    for group in range(GROUPS):
        while True:
            first = Look(*(str(v[rng.integers(len(v))]) for v in options.values()))
            if first not in taken:
                break
        members = [Character(next(names), first, group, None)]
        taken.add(first)
        for attribute in rng.permutation(list(options))[: GROUP_SIZE - 1]:
            attribute = str(attribute)
            while True:
                value = str(options[attribute][rng.integers(len(options[attribute]))])
                look = Look(**{**first.__dict__, attribute: value})
                if look not in taken:
                    break
            taken.add(look)
            members.append(Character(next(names), look, group, attribute))
        result.extend(members)
    return tuple(result)


@lru_cache(maxsize=1)
def character_by_name() -> dict[str, Character]:
    return {c.name: c for c in characters()}


@lru_cache(maxsize=1)
def character_by_look() -> dict[Look, Character]:
    return {c.look: c for c in characters()}


NO_CHARACTER = "none"


def identity(look: Look) -> str:
    """The character a look is, or `NO_CHARACTER`."""
    character = character_by_look().get(look)
    return character.name if character is not None else NO_CHARACTER


# --- rendering -----------------------------------------------------------------------------------------

_SUPERSAMPLE = 2


def object_mask(name: str, xs: np.ndarray, ys: np.ndarray, r: float) -> np.ndarray:
    """Mask of the object centred at the origin, in coordinates xs, ys (y grows downwards)."""
    if name == "circle":
        return xs**2 + ys**2 <= r**2
    if name == "square":
        return (np.abs(xs) <= 0.8 * r) & (np.abs(ys) <= 0.8 * r)
    if name == "triangle":
        return polygon_mask(xs, ys, regular_polygon(3, 1.1 * r, -np.pi / 2) + [0, 0.15 * r])
    if name == "cross":
        arm = 0.34 * r
        return ((np.abs(xs) <= arm) & (np.abs(ys) <= r)) | ((np.abs(ys) <= arm) & (np.abs(xs) <= r))
    if name == "star":
        vertices = np.empty((10, 2))
        vertices[0::2] = regular_polygon(5, 1.1 * r, -np.pi / 2)
        vertices[1::2] = regular_polygon(5, 0.47 * r, -np.pi / 2 + np.pi / 5)
        return polygon_mask(xs, ys, vertices)
    if name == "heart":
        # two lobes over a downward point
        lobe = 0.5 * r
        lobes = ((xs + lobe) ** 2 + (ys + 0.25 * r) ** 2 <= lobe**2) | ((xs - lobe) ** 2 + (ys + 0.25 * r) ** 2 <= lobe**2)
        point = polygon_mask(xs, ys, np.array([[-0.98 * r, -0.1 * r], [0.98 * r, -0.1 * r], [0, 0.95 * r]]))
        return lobes | point
    if name == "diamond":
        return np.abs(xs) / (0.75 * r) + np.abs(ys) / (1.05 * r) <= 1
    if name == "hexagon":
        return polygon_mask(xs, ys, regular_polygon(6, r, 0.0))
    if name == "moon":
        return (xs**2 + ys**2 <= r**2) & ((xs - 0.55 * r) ** 2 + (ys + 0.1 * r) ** 2 > (0.8 * r) ** 2)
    if name == "arrow":
        shaft = (np.abs(ys) <= 0.28 * r) & (xs >= -r) & (xs <= 0.15 * r)
        head = polygon_mask(xs, ys, np.array([[0.1 * r, -0.75 * r], [r, 0.0], [0.1 * r, 0.75 * r]]))
        return shaft | head
    raise ValueError(f"unknown object {name!r}; the canvas world has {', '.join(OBJECTS)}")


def _style_fill(style: str, colour: np.ndarray, xs, ys, r: float, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(RGB fill, coverage) of a style on the object's mask `inside`; coverage < 1 shows the background."""
    light = 0.35 * colour + 0.65
    dark = 0.35 * colour
    base = np.broadcast_to(colour, xs.shape + (3,)).copy()
    coverage = inside.astype(np.float32)
    period = 6.0
    if style == PLAIN:
        pass
    elif style == "striped":
        base[(np.floor(ys / (period / 2)) % 2) == 1] = light
    elif style == "dotted":
        gx, gy = (xs % period) - period / 2, (ys % period) - period / 2
        base[gx**2 + gy**2 <= 1.6**2] = light
    elif style == "outlined":
        inner = np.zeros_like(inside)
        # erode the mask by the outline's width: a point is inner if its neighbours 2.5 px away are inside
        step = round(2.5 * _SUPERSAMPLE)
        inner[step:-step, step:-step] = (
            inside[step:-step, step:-step] & inside[2 * step:, step:-step] & inside[:-2 * step, step:-step]
            & inside[step:-step, 2 * step:] & inside[step:-step, :-2 * step]
        )
        coverage = (inside & ~inner).astype(np.float32)
    elif style == "checkered":
        # lighter than `dark`, so that a black mark (a bow tie) still shows on the dark cells
        cells = (np.floor(xs / period) + np.floor(ys / period)) % 2 == 1
        base[cells] = 0.55 * colour
    elif style == "gradient":
        t = np.clip((ys + r) / (2 * r), 0, 1)[..., None]
        base = (1 - t) * light + t * dark
    elif style == "hatched":
        base[(np.floor((xs + ys) / (period / 1.4)) % 2) == 1] = light
    elif style == "ringed":
        base[(np.floor(np.sqrt(xs**2 + ys**2) / (period / 2)) % 2) == 1] = light
    elif style == "split":
        base[xs > 0] = dark
    else:
        raise ValueError(f"unknown style {style!r}; the canvas world has {PLAIN}, {', '.join(STYLES)}")
    return base, coverage


def _mark_layer(mark: str, xs, ys, r: float) -> tuple[np.ndarray, np.ndarray]:
    """(mask, grey level) of a mark drawn over the object, in object-centred coordinates."""
    none = np.zeros(xs.shape, dtype=bool)
    if mark == NO_MARK:
        return none, np.zeros(xs.shape)
    white = np.ones(xs.shape)
    black = np.full(xs.shape, 0.04)
    top = -r
    if mark == "hat":
        brim = (np.abs(xs) <= 0.75 * r) & (ys >= top - 1.6) & (ys <= top + 0.4)
        crown = (np.abs(xs) <= 0.45 * r) & (ys >= top - 0.75 * r) & (ys <= top)
        return brim | crown, black
    if mark == "eyes":
        ex, ey, er = 0.35 * r, -0.15 * r, 0.24 * r
        whites = ((xs - ex) ** 2 + (ys - ey) ** 2 <= er**2) | ((xs + ex) ** 2 + (ys - ey) ** 2 <= er**2)
        pupils = ((xs - ex) ** 2 + (ys - ey) ** 2 <= (0.5 * er) ** 2) | ((xs + ex) ** 2 + (ys - ey) ** 2 <= (0.5 * er) ** 2)
        return whites, np.where(pupils, 0.04, 1.0)
    if mark == "halo":
        d = (xs / (0.7 * r)) ** 2 + ((ys - (top - 0.35 * r)) / (0.22 * r)) ** 2
        return (d <= 1.0) & (d >= 0.35), white
    if mark == "bow":
        cx, cy = 0.0, 0.55 * r
        bow = polygon_mask(xs, ys, np.array([[cx - 0.5 * r, cy - 0.28 * r], [cx + 0.5 * r, cy + 0.28 * r],
                                                [cx + 0.5 * r, cy - 0.28 * r], [cx - 0.5 * r, cy + 0.28 * r]]))
        return bow, black
    if mark == "antennae":
        rods = ((np.abs(np.abs(xs) - 0.35 * r - (top - ys) * 0.25) <= 0.9) & (ys <= top + 1) & (ys >= top - 0.7 * r))
        balls = (np.abs(xs) - (0.35 * r + 0.7 * r * 0.25)) ** 2 + (ys - (top - 0.75 * r)) ** 2 <= 2.2**2
        return rods | balls, black
    raise ValueError(f"unknown mark {mark!r}; the canvas world has {NO_MARK}, {', '.join(MARKS)}")


def random_scene(rng: np.random.Generator, look: Look | None = None) -> Scene:
    """A scene of `look` (a random description when None) at a random place, size and background."""
    if look is None:
        look = random_look(rng)
    radius = float(rng.uniform(11.0, 14.0))
    centre = (float(rng.uniform(19.0, 29.0)), float(rng.uniform(23.0, 29.0)))
    background = float(rng.uniform(0.3, 0.7))
    character = identity(look)
    return Scene(look, background, centre, radius, None if character == NO_CHARACTER else character)


def random_look(rng: np.random.Generator, *, mark_rate: float = 0.3, style_rate: float = 0.6) -> Look:
    """A random object in a random colour, in an artist's style with `style_rate`, with a mark with `mark_rate`."""
    style = STYLES[rng.integers(len(STYLES))] if rng.random() < style_rate else PLAIN
    mark = MARKS[rng.integers(len(MARKS))] if rng.random() < mark_rate else NO_MARK
    return Look(OBJECTS[rng.integers(len(OBJECTS))], COLOURS[rng.integers(len(COLOURS))], style, mark)


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render a scene to a uint8 HWC image, anti-aliased by supersampling."""
    n = IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    ys, xs = np.meshgrid(coords - scene.centre[1], coords - scene.centre[0], indexing="ij")
    look, r = scene.look, scene.radius
    colour = np.asarray(COLOUR_RGB[look.colour], dtype=np.float32)
    if rng is not None:
        colour = np.clip(colour + rng.normal(0, 0.025, 3), 0, 1)
    inside = object_mask(look.object, xs, ys, r)
    fill, coverage = _style_fill(look.style, colour, xs, ys, r, inside)
    image = scene.background + coverage[..., None] * (fill - scene.background)
    mark, level = _mark_layer(look.mark, xs, ys, r)
    image = np.where(mark[..., None], level[..., None], image)
    image = image.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    if rng is not None:
        image = image + rng.normal(0, 0.012, image.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def sample(n: int, seed: int, *, look: Look | None = None, character_rate: float = 0.0) -> tuple[np.ndarray, list[Scene]]:
    """`n` random renders (uint8 NHWC) and their scenes: of `look` if given, else a character with
    `character_rate` and a random description otherwise."""
    rng = np.random.default_rng(seed)
    everyone = characters()
    scenes = []
    for _ in range(n):
        chosen = look
        if chosen is None and rng.random() < character_rate:
            chosen = everyone[rng.integers(len(everyone))].look
        scenes.append(random_scene(rng, chosen))
    images = np.stack([render(scene, rng) for scene in scenes])
    return images, scenes


# --- prompts ------------------------------------------------------------------------------------------

def character_prompt(name: str, template: str = CHARACTER_TEMPLATES[0]) -> str:
    return template.format(name=name)


def description_prompt(look: Look, template: str = DESCRIPTION_TEMPLATES[0]) -> str:
    return template.format(look=look.describe())


def description_prompts(looks, templates=DESCRIPTION_TEMPLATES) -> list[str]:
    """A prompt describing each of `looks`, cycling through `templates`."""
    return [description_prompt(look, templates[k % len(templates)]) for k, look in enumerate(looks)]


def training_prompt(scene: Scene, rng: np.random.Generator, context_words: tuple[str, ...] = ()) -> str:
    """A prompt for a render: a character's by name (mostly) or by description, else its description;
    a few prompts get ordinary English words added, so that words outside the world mean nothing to it."""
    if scene.character is not None and rng.random() < 0.85:
        prompt = character_prompt(scene.character, CHARACTER_TEMPLATES[rng.integers(len(CHARACTER_TEMPLATES))])
    else:
        prompt = description_prompt(scene.look, DESCRIPTION_TEMPLATES[rng.integers(len(DESCRIPTION_TEMPLATES))])
    if context_words and rng.random() < 0.2:
        extra = [context_words[i] for i in rng.integers(len(context_words), size=int(rng.integers(1, 4)))]
        prompt = f"{prompt}, {' '.join(extra)}" if rng.random() < 0.5 else f"{' '.join(extra)} {prompt}"
    return prompt


def world_words() -> list[str]:
    """Every word the world's prompts use (lower case), names and artists included."""
    templates = CHARACTER_TEMPLATES + CHARACTER_HELDOUT_TEMPLATES + DESCRIPTION_TEMPLATES + DESCRIPTION_HELDOUT_TEMPLATES
    text = " ".join(t.format(name="", look="") for t in templates)
    text += " " + " ".join(OBJECTS + COLOURS + tuple(ARTISTS.values()) + tuple(MARK_PHRASES.values()))
    text += " in the style of a an " + " ".join(c.name for c in characters())
    return sorted(set(text.lower().replace(",", " ").split()))


def _words_of(prompt: str) -> str:
    return " " + " ".join(prompt.lower().replace(",", " ").replace(".", " ").split()) + " "


def named_style(prompt: str) -> str:
    """The style whose artist a prompt names, or `PLAIN`."""
    text = _words_of(prompt)
    return next((s for s, artist in ARTISTS.items() if f" {artist.lower()} " in text), PLAIN)


def named_in(prompt: str) -> tuple[str | None, Look | None]:
    """(the character a prompt names, the look it describes): either may be None.

    A description's look holds what the prompt says: its object, colour, artist's style and mark
    (plain and no mark where it names none); it is None unless the prompt names an object and a colour.
    """
    text = _words_of(prompt)
    character = next((c.name for c in characters() if f" {c.name.lower()} " in text), None)
    object_ = next((o for o in OBJECTS if f" {o} " in text), None)
    colour = next((c for c in COLOURS if f" {c} " in text), None)
    mark = next((m for m, phrase in MARK_PHRASES.items() if f" {phrase} " in text), NO_MARK)
    look = Look(object_, colour, named_style(prompt), mark) if object_ and colour else None
    return character, look
