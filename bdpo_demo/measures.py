"""Four properties of a demo-world image, on deliberately different scales (numpy only).

Each measure takes an image float [H, W, 3] in [0, 1] and the prompt's `Spec`:

    colour     0..1     how close the object's pixels are to the prompt's colour
    shape      1..10    IoU of the object with the prompt's shape of the same area and centre
    position   0..100   closeness of the object's centroid to the prompt's position
    sharpness  -1..1    steepest edge step relative to the object/background colour step

They see the object as the pixels that differ visibly from the prompt's background colour
(soft weights), so they judge independent properties: a blue square in the right place scores
high on position and shape and low on colour for the prompt "a red square ...".

Invisible deviations do not count: a pixel within VISIBLE_DISTANCE of the background is
background, a neighbour step below VISIBLE_STEP is not an edge. Without these dead zones the
perfect renders (as 8-bit images) with noise of std 0.01 added (2.5 of 255 levels per channel,
at the threshold of seeing it on a flat field) scored shape 1.7 on average where the renders
themselves scored 8.1 (9.3 now), and sharpness -0.34 instead of 0.25: the faint noise of ~900
background pixels outweighed the object's ~120 pixels, so a generated image's shape, colour and
sharpness measured its background's haze, not its object. Each dead zone is the smallest (in
steps of 0.005) at which that noise moves no mean score of perfect renders by more than 1% of
the measure's range (tests/test_demo_world.py checks both halves of that statement).

    python -m bdpo_demo.measures   # that calibration as a table: these dead zones, smaller, none
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

import numpy as np

from bdpo_demo.world import (
    BACKGROUNDS,
    OBJECT_COLOURS,
    POSITIONS,
    Spec,
    all_specs,
    render,
    shape_mask,
)

FOREGROUND_DISTANCE = 0.35  # RGB distance from the background at which a pixel is fully object
VISIBLE_DISTANCE = 0.03  # RGB distance from the background below which a pixel is background
VISIBLE_STEP = 0.05  # RGB distance between neighbours below which a step is not an edge
MIN_OBJECT_PIXELS = 4.0  # less soft object area than this counts as "no object"


def object_weights(image_HxWx3: np.ndarray, spec: Spec) -> np.ndarray:
    """Soft object mask [H, W] in [0, 1]: 0 up to VISIBLE_DISTANCE from the background
    colour, rising linearly to 1 at FOREGROUND_DISTANCE."""
    distance = np.linalg.norm(image_HxWx3 - np.asarray(BACKGROUNDS[spec.background]), axis=-1)
    visible = (distance - VISIBLE_DISTANCE) / (FOREGROUND_DISTANCE - VISIBLE_DISTANCE)
    return np.clip(visible, 0.0, 1.0)


def _centroid(weights_HxW: np.ndarray) -> tuple[float, float]:
    rows, cols = np.mgrid[0 : weights_HxW.shape[0], 0 : weights_HxW.shape[1]] + 0.5
    total = weights_HxW.sum()
    return float((rows * weights_HxW).sum() / total), float((cols * weights_HxW).sum() / total)


def colour_score(image_HxWx3: np.ndarray, spec: Spec) -> float:
    """0..1: object-weighted mean of exp(-d^2 / 0.1), d = RGB distance to the prompt colour."""
    weights = object_weights(image_HxWx3, spec)
    if weights.sum() < MIN_OBJECT_PIXELS:
        return 0.0
    distance = np.linalg.norm(image_HxWx3 - np.asarray(OBJECT_COLOURS[spec.colour]), axis=-1)
    return float((weights * np.exp(-(distance**2) / 0.1)).sum() / weights.sum())


def shape_score(image_HxWx3: np.ndarray, spec: Spec) -> float:
    """1..10: 1 + 9 * clip(2 * IoU - 1, 0, 1), IoU (soft) with the prompt's shape placed at
    the object's centroid with the object's area."""
    weights = object_weights(image_HxWx3, spec)
    area = weights.sum()
    if area < MIN_OBJECT_PIXELS:
        return 1.0
    template = shape_mask(spec.shape, _centroid(weights), area, weights.shape[0])
    iou = np.minimum(weights, template).sum() / np.maximum(weights, template).sum()
    return float(1.0 + 9.0 * np.clip(2.0 * iou - 1.0, 0.0, 1.0))


def position_score(image_HxWx3: np.ndarray, spec: Spec) -> float:
    """0..100: 100 * (1 - centroid distance to the target / half the image side), clipped."""
    weights = object_weights(image_HxWx3, spec)
    if weights.sum() < MIN_OBJECT_PIXELS:
        return 0.0
    size = weights.shape[0]
    target = np.asarray(POSITIONS[spec.position]) * size
    distance = np.linalg.norm(np.asarray(_centroid(weights)) - target)
    return float(100.0 * np.clip(1.0 - distance / (0.5 * size), 0.0, 1.0))


def sharpness_score(image_HxWx3: np.ndarray, spec: Spec) -> float:
    """-1..1: 2 * clip(sum(g^2) / (sum(g) * colour step), 0, 1) - 1 over the visible neighbour
    steps g (g >= VISIBLE_STEP).

    A crisp edge steps from background to object colour within one pixel (ratio ~1); blur
    spreads the step over n pixels of step/n each (ratio ~1/n).
    """
    step = np.linalg.norm(
        np.asarray(OBJECT_COLOURS[spec.colour]) - np.asarray(BACKGROUNDS[spec.background])
    )
    dy = np.linalg.norm(np.diff(image_HxWx3, axis=0), axis=-1).ravel()
    dx = np.linalg.norm(np.diff(image_HxWx3, axis=1), axis=-1).ravel()
    steps = np.concatenate([dx, dy])
    steps = steps[steps >= VISIBLE_STEP]
    if steps.sum() < 1e-6:
        return -1.0
    ratio = (steps**2).sum() / (steps.sum() * step)
    return float(2.0 * np.clip(ratio, 0.0, 1.0) - 1.0)


MEASURES = {
    "colour": colour_score,
    "shape": shape_score,
    "position": position_score,
    "sharpness": sharpness_score,
}

MEASURE_RANGES = {
    "colour": (0.0, 1.0),
    "shape": (1.0, 10.0),
    "position": (0.0, 100.0),
    "sharpness": (-1.0, 1.0),
}
INVISIBLE_NOISE_STD = 0.01  # 2.5 of 255 levels: at the threshold of seeing it on a flat field


@contextlib.contextmanager
def dead_zones(visible_distance: float, visible_step: float) -> Iterator[None]:
    """Other dead zones inside the block (the calibration below and its test); restored on
    exit."""
    global VISIBLE_DISTANCE, VISIBLE_STEP
    saved = VISIBLE_DISTANCE, VISIBLE_STEP
    VISIBLE_DISTANCE, VISIBLE_STEP = visible_distance, visible_step
    try:
        yield
    finally:
        VISIBLE_DISTANCE, VISIBLE_STEP = saved


def invisible_noise_means(
    noise_std: float = INVISIBLE_NOISE_STD, seed: int = 1
) -> dict[str, tuple[float, float, float]]:
    """Per measure: (mean score of the 180 perfect renders, mean of the same renders with
    Gaussian noise of `noise_std` added, |difference| / the measure's range), both as the
    scorers see them: 8-bit images."""
    specs = all_specs()
    rng = np.random.default_rng(seed)

    def as_8bit(image: np.ndarray) -> np.ndarray:
        return np.round(np.clip(image, 0.0, 1.0) * 255) / 255

    renders = [render(s) for s in specs]
    clean = [as_8bit(r) for r in renders]
    noisy = [as_8bit(r + rng.normal(0.0, noise_std, r.shape)) for r in renders]
    out = {}
    for name, fn in MEASURES.items():
        a = float(np.mean([fn(i, s) for i, s in zip(clean, specs, strict=True)]))
        b = float(np.mean([fn(i, s) for i, s in zip(noisy, specs, strict=True)]))
        low, high = MEASURE_RANGES[name]
        out[name] = (a, b, abs(a - b) / (high - low))
    return out


def main(argv: list[str] | None = None) -> None:
    """Prints the dead zones' calibration: each measure's mean on perfect renders without and
    with invisible noise, for these dead zones, each 0.005 smaller, and none."""
    parser = argparse.ArgumentParser(prog="python -m bdpo_demo.measures", description=main.__doc__)
    parser.add_argument("--noise-std", type=float, default=INVISIBLE_NOISE_STD)
    args = parser.parse_args(argv)
    if not args.noise_std > 0:
        parser.error(f"--noise-std must be > 0, got {args.noise_std}")
    rows = {
        "these": (VISIBLE_DISTANCE, VISIBLE_STEP),
        "distance 0.005 smaller": (VISIBLE_DISTANCE - 0.005, VISIBLE_STEP),
        "step 0.005 smaller": (VISIBLE_DISTANCE, VISIBLE_STEP - 0.005),
        "none (before)": (0.0, 0.0),
    }
    print(f"perfect renders (8-bit) -> with noise of std {args.noise_std}; shift in % of range")
    print("| dead zones (distance, step) | " + " | ".join(MEASURES) + " |")
    print("|---|" + "---|" * len(MEASURES))
    for label, (distance, step) in rows.items():
        with dead_zones(distance, step):
            means = invisible_noise_means(args.noise_std)
        cells = [f"{a:.3f} -> {b:.3f} ({100 * shift:.2f}%)" for a, b, shift in means.values()]
        print(f"| {label} ({distance:.3f}, {step:.3f}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
