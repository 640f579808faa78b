"""The demo's UNet and its latent layout: pixels folded 2x2 into channels (12 x 16 x 16).

The "latent" of a 32x32 RGB image is the image in [-1, 1] pixel-unshuffled by FACTOR
(torch.nn.PixelUnshuffle's channel order: c * f * f + i * f + j): lossless, like the identity
encoder, but the UNet works at 16x16, a quarter of the positions, so a CPU step is ~4x cheaper
and the world's 32 px objects are drawn by a wider network (`--latent-encoder pixel_unshuffle`,
registered in bdpo_demo.plugins). The first level is a plain DownBlock2D/UpBlock2D; attention
runs at the lower levels. The dict is a complete diffusers config.json:
`diffusers.UNet2DConditionModel.from_config` builds the same network.

`config.demo.pixel_fold = 1` keeps plain RGB at 32x32 (the generic identity encoder),
`config.demo.plain_levels` sets how many levels, from the first, have no attention, and
`config.demo.image_size` draws the world at another side: the variants the README's base
study compares.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from bdpo_demo import world
from bdpo_jax.models import presets

FACTOR = 2  # pixels folded into channels per side
LATENT_ENCODER = "pixel_unshuffle"  # its name for the preprocessing CLI
NORM_GROUPS = 8  # GroupNorm groups of every level


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


def fold_of(channels: int) -> int:
    """The pixel fold f of latents with `channels` = 3 f^2 channels (1: plain RGB)."""
    factor = int(round(np.sqrt(channels / 3)))
    if factor < 1 or 3 * factor**2 != channels:
        raise ValueError(f"{channels} latent channels are neither RGB nor unshuffled RGB")
    return factor


def latents_to_images(x_NxCxHxW: np.ndarray) -> np.ndarray:
    """The demo UNet's sample -> RGB in [-1, 1] (unclipped): 3 channels are pixels already,
    3 f^2 channels are unshuffled pixels."""
    factor = fold_of(x_NxCxHxW.shape[1])
    return x_NxCxHxW if factor == 1 else pixel_shuffle(x_NxCxHxW, factor)


def demo_unet_config(
    channels: Sequence[int] = (32, 64, 64),
    *,
    fold: int = FACTOR,
    plain_levels: int = 1,
    cross_attention_dim: int = 384,
    heads: int = 4,
    image_size: int = world.IMAGE_SIZE,
) -> dict[str, Any]:
    """diffusers config dict of the demo UNet for `image_size` px images: RGB folded `fold` x
    `fold` into channels in and out (`fold` 1: plain RGB), MiniLM-width conditioning, the first
    `plain_levels` levels (from the full-resolution one) without attention."""
    levels = len(channels)
    if levels < 2:
        raise ValueError(f"channels={tuple(channels)}: the demo UNet needs at least 2 levels")
    if not 0 <= plain_levels < levels:
        raise ValueError(
            f"plain_levels={plain_levels}: need 0 <= plain_levels < {levels} (the number of "
            "levels in channels): text reaches the UNet only through attention levels"
        )
    if any(int(c) % NORM_GROUPS for c in channels):
        raise ValueError(
            f"channels={tuple(channels)}: each must be a multiple of {NORM_GROUPS} "
            "(GroupNorm's groups)"
        )
    latent_encoder_name(fold)  # checks fold
    halvings = 2 ** (levels - 1)  # each level below the first halves the side
    if image_size < 1 or image_size % (fold * halvings):
        raise ValueError(
            f"image_size={image_size}: the UNet's {levels} levels on pixels folded {fold}x{fold} "
            f"need a side that is a multiple of {fold * halvings}"
        )
    in_channels = 3 * fold**2
    return presets.complete_config(
        {
            "sample_size": image_size // fold,
            "in_channels": in_channels,
            "out_channels": in_channels,
            "block_out_channels": [int(c) for c in channels],
            "layers_per_block": 1,
            "norm_num_groups": NORM_GROUPS,
            "cross_attention_dim": cross_attention_dim,
            "attention_head_dim": heads,  # diffusers' SD1.5 naming: the number of heads
            "down_block_types": ["DownBlock2D"] * plain_levels
            + ["CrossAttnDownBlock2D"] * (levels - plain_levels),
            "up_block_types": ["CrossAttnUpBlock2D"] * (levels - plain_levels)
            + ["UpBlock2D"] * plain_levels,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
        }
    )


def unet_config_for(demo: Any, **overrides: Any) -> dict[str, Any]:
    """`demo_unet_config` of a `config.demo` section (its channels, pixel_fold, plain_levels
    and image_size)."""
    return demo_unet_config(
        tuple(demo.channels), fold=int(demo.pixel_fold), plain_levels=int(demo.plain_levels),
        image_size=int(demo.image_size), **overrides,
    )  # fmt: skip


def write_unet_config(path: str, unet_config: dict[str, Any]) -> str:
    """Writes a demo UNet's config.json to `path` (for config.model.unet_config)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(unet_config, f, indent=1)
    return path


def latent_encoder_name(fold: int) -> str:
    """The preprocessing CLI's --latent-encoder for images folded `fold` x `fold` (1: the
    generic identity encoder, FACTOR: this module's unshuffle)."""
    names = {1: "identity", FACTOR: LATENT_ENCODER}
    if fold not in names:
        raise ValueError(f"fold={fold}: the demo folds pixels by one of {sorted(names)}")
    return names[fold]


def images_to_latents(images_Nx3xHxW: np.ndarray, fold: int) -> np.ndarray:
    """RGB [N, 3, H, W] in [-1, 1] -> the demo UNet's latents for `fold` (what the latent
    encoder of `latent_encoder_name(fold)` writes)."""
    return pixel_unshuffle(images_Nx3xHxW, fold) if fold > 1 else np.asarray(images_Nx3xHxW)
