"""Four properties of a demo-world image, on deliberately different scales (numpy only).

Each measure takes an image float [H, W, 3] in [0, 1] and the prompt's `Spec`:

    colour     0..1     how close the object's pixels are to the prompt's colour
    shape      1..10    IoU of the object with the prompt's shape of the same area and centre
    position   0..100   closeness of the object's centroid to the prompt's position
    sharpness  -1..1    steepest edge step relative to the object/background colour step

They see the object as the pixels that differ from the prompt's background colour (soft
weights), so they judge independent properties: a blue square in the right place scores
high on position and shape and low on colour for the prompt "a red square ...".
"""

from __future__ import annotations

import numpy as np

from bdpo_demo.world import BACKGROUNDS, OBJECT_COLOURS, POSITIONS, Spec, shape_mask

FOREGROUND_DISTANCE = 0.35  # RGB distance from the background at which a pixel is fully object
MIN_OBJECT_PIXELS = 4.0  # less soft object area than this counts as "no object"


def object_weights(image_HxWx3: np.ndarray, spec: Spec) -> np.ndarray:
    """Soft object mask [H, W] in [0, 1]: distance from the background colour, clipped."""
    distance = np.linalg.norm(image_HxWx3 - np.asarray(BACKGROUNDS[spec.background]), axis=-1)
    return np.clip(distance / FOREGROUND_DISTANCE, 0.0, 1.0)


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
    """-1..1: 2 * clip(sum(g^2) / (sum(g) * colour step), 0, 1) - 1 over neighbour steps g.

    A crisp edge steps from background to object colour within one pixel (ratio ~1); blur
    spreads the step over n pixels of step/n each (ratio ~1/n).
    """
    step = np.linalg.norm(
        np.asarray(OBJECT_COLOURS[spec.colour]) - np.asarray(BACKGROUNDS[spec.background])
    )
    dy = np.linalg.norm(np.diff(image_HxWx3, axis=0), axis=-1).ravel()
    dx = np.linalg.norm(np.diff(image_HxWx3, axis=1), axis=-1).ravel()
    steps = np.concatenate([dx, dy])
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
