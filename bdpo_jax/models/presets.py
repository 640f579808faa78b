"""Diffusers UNet2DConditionModel config dicts: tiny test models and the real SD configs.

Every dict returned here is a complete diffusers ``config.json`` for ``UNet2DConditionModel``
(all constructor keys, defaults filled in), so ``diffusers.UNet2DConditionModel.from_config(cfg)``
and ``bdpo_jax.models.UNet2DConditionModel.from_config(cfg)`` build the same network.

SDXL conditioning ("text_time"): the UNet receives ``text_embeds`` [B, P] (the pooled text
embedding of the second text encoder, P = 1280 for SDXL) and ``time_ids`` [B, 6]
(original size, crop top-left, target size). Each time id is embedded sinusoidally with
``addition_time_embed_dim`` channels, flattened and concatenated after ``text_embeds``, so

    projection_class_embeddings_input_dim = P + 6 * addition_time_embed_dim
    (SDXL base: 1280 + 6 * 256 = 2816)

``sdxl_pooled_dim(config)`` inverts this to find P from a config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from bdpo_jax.models.unet_config import DIFFUSERS_DEFAULTS

CONFIG_DIR = Path(__file__).parent / "configs"
REAL_CONFIGS = ("sd15", "sd21", "sdxl")
NUM_TIME_IDS = 6  # SDXL time_ids: original (h, w), crop (top, left), target (h, w)
TINY_SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim of the tiny SDXL-like config


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """Returns a copy of ``config`` with every diffusers constructor key present."""
    out = copy.deepcopy(DIFFUSERS_DEFAULTS)
    out.update(copy.deepcopy(dict(config)))
    out.setdefault("_class_name", "UNet2DConditionModel")
    return out


def sdxl_projection_dim(pooled_dim: int, addition_time_embed_dim: int) -> int:
    """``projection_class_embeddings_input_dim`` for a "text_time" UNet."""
    return pooled_dim + NUM_TIME_IDS * addition_time_embed_dim


def sdxl_pooled_dim(config: dict[str, Any]) -> int:
    """Width P of ``added_cond_kwargs["text_embeds"]`` that a "text_time" config expects."""
    if config.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"addition_embed_type={config.get('addition_embed_type')!r}: "
            "only 'text_time' configs take text_embeds"
        )
    return int(
        config["projection_class_embeddings_input_dim"]
        - NUM_TIME_IDS * config["addition_time_embed_dim"]
    )


def tiny_unet_config(
    family: str = "sd15",
    *,
    in_channels: int = 4,
    out_channels: int | None = None,
    sample_size: int = 8,
    cross_attention_dim: int = 32,
) -> dict[str, Any]:
    """A tiny randomly-initialisable UNet config with the block structure of ``family``.

    Families: "sd15" (conv proj_in/out, attention_head_dim int), "sd21" (linear projection,
    per-level heads, upcast attention), "sdxl" (text_time added conditioning, first down block
    without attention, 2 transformer layers at the second level). For "sdxl" the pooled text
    width P equals ``cross_attention_dim`` (see ``sdxl_pooled_dim``).
    """
    base: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels if out_channels is None else out_channels,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": cross_attention_dim,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
    }
    if family == "sd15":
        base.update(
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=2,
        )
    elif family == "sd21":
        base.update(
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=[2, 4],
            use_linear_projection=True,
            upcast_attention=True,
        )
    elif family == "sdxl":
        base.update(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=[2, 4],
            transformer_layers_per_block=[1, 2],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=sdxl_projection_dim(
                cross_attention_dim, TINY_SDXL_TIME_EMBED_DIM
            ),
        )
    else:
        raise ValueError(f"family={family!r} is not one of 'sd15', 'sd21', 'sdxl'")
    return complete_config(base)


def real_unet_config(name: str) -> dict[str, Any]:
    """The published UNet config.json of a real model, completed with diffusers defaults.

    ``name``: "sd15" (stable-diffusion-v1-5/stable-diffusion-v1-5), "sd21"
    (stabilityai/stable-diffusion-2-1) or "sdxl" (stabilityai/stable-diffusion-xl-base-1.0).
    """
    if name not in REAL_CONFIGS:
        raise ValueError(f"name={name!r} is not one of {REAL_CONFIGS}")
    with open(CONFIG_DIR / f"{name}.json") as f:
        return complete_config(json.load(f))
