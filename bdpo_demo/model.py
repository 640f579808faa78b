"""The demo's UNet: a small SD1.5-family UNet2DConditionModel in pixel space (3 x 32 x 32).

Attention runs only at 16x16 and 8x8 (self-attention over 1,024 pixels would dominate a CPU
step), so the first level is a plain DownBlock2D/UpBlock2D. The dict is a complete diffusers
config.json: `diffusers.UNet2DConditionModel.from_config` builds the same network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from bdpo_jax.models import presets


def demo_unet_config(
    channels: Sequence[int] = (32, 64, 64),
    *,
    cross_attention_dim: int = 384,
    sample_size: int = 32,
    heads: int = 4,
) -> dict[str, Any]:
    """diffusers config dict of the demo UNet (RGB in and out, MiniLM-width conditioning)."""
    levels = len(channels)
    if levels < 2:
        raise ValueError(f"channels={tuple(channels)}: the demo UNet needs at least 2 levels")
    return presets.complete_config(
        {
            "sample_size": sample_size,
            "in_channels": 3,
            "out_channels": 3,
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
