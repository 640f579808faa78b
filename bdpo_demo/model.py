"""The demo's UNet and its latent layout: pixels folded 2x2 into channels (12 x 16 x 16).

The "latent" of a 32x32 RGB image is the image in [-1, 1] pixel-unshuffled by FACTOR
(torch.nn.PixelUnshuffle's channel order: c * f * f + i * f + j): lossless, like the identity
encoder, but the UNet works at 16x16, a quarter of the positions, so a CPU step is ~4x cheaper
and the world's 32 px objects are drawn by a wider network (`--latent-encoder pixel_unshuffle`,
registered in bdpo_demo.plugins). The first level is a plain DownBlock2D/UpBlock2D; attention
runs at the lower levels. The dict is a complete diffusers config.json:
`diffusers.UNet2DConditionModel.from_config` builds the same network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from bdpo_jax.models import presets

FACTOR = 2  # pixels folded into channels per side
LATENT_ENCODER = "pixel_unshuffle"  # its name for the preprocessing CLI


def pixel_unshuffle(x_NxCxHxW: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """[N, C, H, W] -> [N, C f^2, H / f, W / f]; channel c f^2 + i f + j holds pixel (i, j)
    of each f x f cell (torch.nn.functional.pixel_unshuffle's order)."""
    n, c, h, w = x_NxCxHxW.shape
    if h % factor or w % factor:
        raise ValueError(f"image side {h}x{w} is not a multiple of {factor}")
    cells = x_NxCxHxW.reshape(n, c, h // factor, factor, w // factor, factor)
    return cells.transpose(0, 1, 3, 5, 2, 4).reshape(n, c * factor**2, h // factor, w // factor)


def pixel_shuffle(x_NxCxHxW: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """Inverse of `pixel_unshuffle`: [N, C f^2, H, W] -> [N, C, H f, W f]."""
    n, c, h, w = x_NxCxHxW.shape
    if c % factor**2:
        raise ValueError(f"{c} channels is not a multiple of {factor**2}")
    cells = x_NxCxHxW.reshape(n, c // factor**2, factor, factor, h, w)
    return cells.transpose(0, 1, 4, 2, 5, 3).reshape(n, c // factor**2, h * factor, w * factor)


def latents_to_images(x_NxCxHxW: np.ndarray) -> np.ndarray:
    """The demo UNet's sample -> RGB in [-1, 1] (unclipped): 3 channels are pixels already,
    3 f^2 channels are unshuffled pixels."""
    channels = x_NxCxHxW.shape[1]
    if channels == 3:
        return x_NxCxHxW
    factor = int(round(np.sqrt(channels / 3)))
    if 3 * factor**2 != channels:
        raise ValueError(f"{channels} latent channels are neither RGB nor unshuffled RGB")
    return pixel_shuffle(x_NxCxHxW, factor)


def demo_unet_config(
    channels: Sequence[int] = (32, 64, 64),
    *,
    cross_attention_dim: int = 384,
    sample_size: int = 32 // FACTOR,
    in_channels: int = 3 * FACTOR**2,
    heads: int = 4,
) -> dict[str, Any]:
    """diffusers config dict of the demo UNet (unshuffled RGB in and out, MiniLM-width
    conditioning)."""
    levels = len(channels)
    if levels < 2:
        raise ValueError(f"channels={tuple(channels)}: the demo UNet needs at least 2 levels")
    return presets.complete_config(
        {
            "sample_size": sample_size,
            "in_channels": in_channels,
            "out_channels": in_channels,
            "block_out_channels": [int(c) for c in channels],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": cross_attention_dim,
            "attention_head_dim": heads,  # diffusers' SD1.5 naming: the number of heads
            "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1),
            "up_block_types": ["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
        }
    )


def write_unet_config(path: str, channels: Sequence[int] = (32, 64, 64)) -> str:
    """Writes the demo UNet's config.json to `path` (for config.model.unet_config)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(demo_unet_config(channels), f, indent=1)
    return path
