"""Diffusers UNet2DConditionModel config dicts: tiny test models and the real SD configs.

Every dict returned here is a complete diffusers ``config.json`` for ``UNet2DConditionModel``
(all constructor keys, defaults filled in), so ``diffusers.UNet2DConditionModel.from_config(cfg)``
and ``bdpo_jax.models.UNet2DConditionModel.from_config(cfg)`` build the same network.

"text_time" conditioning (SDXL, its refiner, Kolors): the UNet receives ``text_embeds`` [B, P]
(a pooled text embedding) and ``time_ids`` [B, N]. Each time id is embedded sinusoidally with
``addition_time_embed_dim`` channels, flattened and concatenated after ``text_embeds``, so

    projection_class_embeddings_input_dim = P + N * addition_time_embed_dim

    SDXL base:    1280 + 6 * 256 = 2816  (original size, crop top-left, target size)
    SDXL refiner: 1280 + 5 * 256 = 2560  (original size, crop top-left, aesthetic score)
    Kolors:       4096 + 6 * 256 = 5632  (P is ChatGLM's width, like its encoder_hid_dim)

The UNet takes whatever N its ``time_ids`` have, checked against this sum; P and N are a
property of the pipeline's conditioning, not of the UNet config, so ``sdxl_pooled_dim`` and
``sdxl_projection_dim`` take N (default 6, ``REFINER_NUM_TIME_IDS`` = 5 for the refiner).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from bdpo_jax.models.unet_config import DIFFUSERS_DEFAULTS

CONFIG_DIR = Path(__file__).parent / "configs"
# name -> published UNet config (configs/<name>.json); see real_unet_config
REAL_CONFIGS = ("sd15", "sd21", "sdxl", "sdxl_refiner", "lcm_sd15", "kolors")
TINY_FAMILIES = ("sd15", "sd21", "sdxl", "sdxl_refiner", "lcm", "kolors")
NUM_TIME_IDS = 6  # SDXL time_ids: original (h, w), crop (top, left), target (h, w)
REFINER_NUM_TIME_IDS = 5  # SDXL refiner: original (h, w), crop (top, left), aesthetic score
TINY_SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim of the tiny "text_time" configs
TINY_TIME_COND_PROJ_DIM = 8  # time_cond_proj_dim of the tiny LCM config
TINY_KOLORS_INNER_DIM = 24  # cross_attention_dim the tiny Kolors config projects text to


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """Returns a copy of ``config`` with every diffusers constructor key present."""
    out = copy.deepcopy(DIFFUSERS_DEFAULTS)
    out.update(copy.deepcopy(dict(config)))
    out.setdefault("_class_name", "UNet2DConditionModel")
    if out["encoder_hid_dim"] is not None and out["encoder_hid_dim_type"] is None:
        out["encoder_hid_dim_type"] = "text_proj"  # diffusers registers this default too
    return out


def sdxl_projection_dim(
    pooled_dim: int, addition_time_embed_dim: int, num_time_ids: int = NUM_TIME_IDS
) -> int:
    """``projection_class_embeddings_input_dim`` for a "text_time" UNet."""
    return pooled_dim + num_time_ids * addition_time_embed_dim


def sdxl_pooled_dim(config: dict[str, Any], num_time_ids: int = NUM_TIME_IDS) -> int:
    """Width P of ``added_cond_kwargs["text_embeds"]`` that a "text_time" config expects when
    ``time_ids`` has ``num_time_ids`` entries (6 for SDXL and Kolors, 5 for the refiner)."""
    if config.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"addition_embed_type={config.get('addition_embed_type')!r}: "
            "only 'text_time' configs take text_embeds"
        )
    pooled = config["projection_class_embeddings_input_dim"] - (
        num_time_ids * config["addition_time_embed_dim"]
    )
    if pooled <= 0:
        raise ValueError(
            f"projection_class_embeddings_input_dim={config['projection_class_embeddings_input_dim']}"
            f" leaves no room for text_embeds beside {num_time_ids} time ids of "
            f"{config['addition_time_embed_dim']} channels"
        )
    return int(pooled)


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
    without attention, 2 transformer layers at the second level), "sdxl_refiner" (three levels,
    attention only in the middle one, 5 time ids), "lcm" ("sd15" with ``time_cond_proj_dim``),
    "kolors" ("sdxl" whose text states, ``cross_attention_dim`` wide, are projected by
    ``encoder_hid_proj`` to ``TINY_KOLORS_INNER_DIM``). For the "text_time" families the pooled
    text width P equals ``cross_attention_dim`` (see ``sdxl_pooled_dim``), that is the width of
    the encoder hidden states the model takes.
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
    if family in ("sd15", "lcm"):
        base.update(
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=2,
        )
        if family == "lcm":
            base.update(time_cond_proj_dim=TINY_TIME_COND_PROJ_DIM)
    elif family == "sd21":
        base.update(
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=[2, 4],
            use_linear_projection=True,
            upcast_attention=True,
        )
    elif family in ("sdxl", "kolors"):
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
        if family == "kolors":
            base.update(
                encoder_hid_dim=cross_attention_dim,
                encoder_hid_dim_type="text_proj",
                cross_attention_dim=TINY_KOLORS_INNER_DIM,
            )
    elif family == "sdxl_refiner":
        base.update(
            block_out_channels=[32, 64, 64],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=[2, 4, 4],
            transformer_layers_per_block=2,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=sdxl_projection_dim(
                cross_attention_dim, TINY_SDXL_TIME_EMBED_DIM, REFINER_NUM_TIME_IDS
            ),
        )
    else:
        raise ValueError(f"family={family!r} is not one of {TINY_FAMILIES}")
    return complete_config(base)


def real_unet_config(name: str) -> dict[str, Any]:
    """The published UNet config.json of a real model, completed with diffusers defaults.

    ``name``: "sd15" (stable-diffusion-v1-5/stable-diffusion-v1-5), "sd21"
    (stabilityai/stable-diffusion-2-1), "sdxl" (stabilityai/stable-diffusion-xl-base-1.0),
    "sdxl_refiner" (stabilityai/stable-diffusion-xl-refiner-1.0), "lcm_sd15"
    (SimianLuo/LCM_Dreamshaper_v7: the SD1.5 layout with ``time_cond_proj_dim`` 256) or
    "kolors" (Kwai-Kolors/Kolors-diffusers).
    """
    if name not in REAL_CONFIGS:
        raise ValueError(f"name={name!r} is not one of {REAL_CONFIGS}")
    with open(CONFIG_DIR / f"{name}.json") as f:
        return complete_config(json.load(f))
