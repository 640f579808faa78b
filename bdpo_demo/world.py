"""The demo's procedural image world: prompts, their parse, and a renderer (numpy only).

A prompt names an object colour, a shape, a background and a position:

    "a red circle on a white background, top left"

`render` draws the prompt at 32x32 (anti-aliased by 4x supersampling; `size` draws it at
another resolution, `config.demo.image_size`). `render_flawed`
draws a training image that is wrong in independent ways with given probabilities (wrong
colour, wrong shape, wrong place, blurred), the imperfect data the demo's base model learns.

`split_specs` divides the 180 prompts into 72 training prompts (SFT data and on-policy pairs)
and 108 held-out prompts (evaluation only): every colour/shape/background is seen at 2 of the
5 positions, rotating, so each held-out prompt is a new combination of seen words.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4
OBJECT_COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
BACKGROUNDS = {"white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05), "gray": (0.5, 0.5, 0.5)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # centre (row, col) as a fraction of the image side
    "top left": (0.3, 0.3),
    "top right": (0.3, 0.7),
    "bottom left": (0.7, 0.3),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
OBJECT_AREA_FRACTION = 0.12  # object area / image area

_PROMPT_RE = re.compile(
    r"^a (?P<colour>\w+) (?P<shape>\w+) on a (?P<background>\w+) background, (?P<position>[\w ]+)$"
)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a prompt asks for."""

    colour: str
    shape: str
    background: str
    position: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background, {self.position}"


def all_specs() -> list[Spec]:
    """Every prompt of the world, in a fixed order."""
    return [
        Spec(c, s, b, p)
        for c, s, b, p in itertools.product(OBJECT_COLOURS, SHAPES, BACKGROUNDS, POSITIONS)
    ]


TRAIN_POSITIONS = 2  # of the 5 positions, per (colour, shape, background), seen in training


def split_specs() -> tuple[list[Spec], list[Spec]]:
    """(training, held-out) prompts, each in `all_specs` order; fixed, independent of seeds.

    (colour c, shape s, background b) is trained at positions k and k + 1 (mod 5), k = (c + s
    + b) mod 5, and held out at the other three. As c, s or b alone varies, k takes every
    value, so every pair of words (colour with position, shape with background, ...) occurs
    in training; a held-out prompt's (colour, shape, background) never sits at that position
    in training. 36 x 2 = 72 training prompts, 108 held out.
    """
    colours, backgrounds, positions = list(OBJECT_COLOURS), list(BACKGROUNDS), list(POSITIONS)
    train, heldout = [], []
    for spec in all_specs():
        k = (colours.index(spec.colour) + SHAPES.index(spec.shape)) % len(positions)
        k = (k + backgrounds.index(spec.background)) % len(positions)
        offset = (positions.index(spec.position) - k) % len(positions)
        (train if offset < TRAIN_POSITIONS else heldout).append(spec)
    return train, heldout


def parse_prompt(prompt: str) -> Spec:
    """Inverse of `Spec.prompt`; a prompt outside the world raises ValueError naming it."""
    match = _PROMPT_RE.match(prompt.strip())
    if not match:
        raise ValueError(f"prompt {prompt!r} is not a demo-world prompt")
    spec = Spec(**match.groupdict())
    if (
        spec.colour not in OBJECT_COLOURS
        or spec.shape not in SHAPES
        or spec.background not in BACKGROUNDS
        or spec.position not in POSITIONS
    ):
        raise ValueError(f"prompt {prompt!r} names something outside the demo world")
    return spec


def shape_mask(shape: str, centre_rc: tuple[float, float], area: float, size: int) -> np.ndarray:
    """Hard mask [size, size] of `shape` with `area` pixels centred at `centre_rc` (pixels)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dr, dc = rows - centre_rc[0], cols - centre_rc[1]
    if shape == "circle":
        radius = np.sqrt(area / np.pi)
        return (dr**2 + dc**2 <= radius**2).astype(np.float64)
    if shape == "square":
        half = np.sqrt(area) / 2
        return ((np.abs(dr) <= half) & (np.abs(dc) <= half)).astype(np.float64)
    if shape == "triangle":  # apex up, base b, height b: area b^2 / 2; centroid at 2/3 height
        base = np.sqrt(2 * area)
        top = -2 * base / 3
        depth = dr - top  # distance below the apex
        inside = (depth >= 0) & (depth <= base) & (np.abs(dc) <= depth / 2)
        return inside.astype(np.float64)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(
    spec: Spec,
    *,
    centre_rc: tuple[float, float] | None = None,
    colour: tuple[float, float, float] | None = None,
    shape: str | None = None,
    blur_sigma: float = 0.0,
    size: int = IMAGE_SIZE,
) -> np.ndarray:
    """Image float32 [size, size, 3] in [0, 1]; keyword overrides draw deliberate flaws."""
    big = size * SUPERSAMPLE
    frac = POSITIONS[spec.position] if centre_rc is None else centre_rc
    centre_big = (frac[0] * big, frac[1] * big)
    area_big = OBJECT_AREA_FRACTION * big * big
    mask = shape_mask(shape or spec.shape, centre_big, area_big, big)
    mask = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    fg = np.asarray(colour or OBJECT_COLOURS[spec.colour])
    bg = np.asarray(BACKGROUNDS[spec.background])
    image = mask[..., None] * fg + (1 - mask[..., None]) * bg
    if blur_sigma > 0:
        image = gaussian_blur(image, blur_sigma)
    return image.astype(np.float32)


def gaussian_blur(image_HxWxC: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image_HxWxC, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    height, width = image_HxWxC.shape[:2]
    rows = sum(w * padded[i : i + height] for i, w in enumerate(taps))
    return sum(w * rows[:, i : i + width] for i, w in enumerate(taps))


@dataclasses.dataclass(frozen=True)
class FlawRates:
    """Independent probabilities of each flaw in the base model's training images."""

    colour: float = 0.45
    shape: float = 0.45
    position: float = 0.45
    blur: float = 0.45


def render_flawed(
    spec: Spec, rates: FlawRates, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> np.ndarray:
    """One training image for `spec` at `size` px, wrong in each way independently with `rates`
    (the blur's sigma is in pixels at any size)."""
    colour = shape = centre = None
    blur = 0.0
    if rng.random() < rates.colour:
        colour = OBJECT_COLOURS[rng.choice([c for c in OBJECT_COLOURS if c != spec.colour])]
    if rng.random() < rates.shape:
        shape = str(rng.choice([s for s in SHAPES if s != spec.shape]))
    if rng.random() < rates.position:
        centre = tuple(rng.uniform(0.25, 0.75, size=2))
    else:
        centre = tuple(np.asarray(POSITIONS[spec.position]) + rng.normal(0, 0.02, size=2))
    if rng.random() < rates.blur:
        blur = float(rng.uniform(1.0, 2.0))
    return render(spec, centre_rc=centre, colour=colour, shape=shape, blur_sigma=blur, size=size)
