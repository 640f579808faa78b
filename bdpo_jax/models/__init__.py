"""Flax port of diffusers UNet2DConditionModel, presets and diffusers weight I/O."""

from bdpo_jax.models.presets import real_unet_config, sdxl_pooled_dim, tiny_unet_config
from bdpo_jax.models.unet import UNet2DConditionModel, init_unet_params
from bdpo_jax.models.weights import load_unet, save_unet

__all__ = [
    "UNet2DConditionModel",
    "init_unet_params",
    "load_unet",
    "real_unet_config",
    "save_unet",
    "sdxl_pooled_dim",
    "tiny_unet_config",
]
