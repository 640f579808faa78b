"""Flax port of diffusers' AutoencoderKL (decoder + post_quant_conv; encoder + quant_conv too).

Mirrors diffusers/models/autoencoders/autoencoder_kl.py (AutoencoderKL), autoencoders/vae.py
(Encoder, Decoder), unets/unet_2d_blocks.py (UNetMidBlock2D, DownEncoderBlock2D,
UpDecoderBlock2D) and the deprecated single-head VAE attention of attention_processor.py
(group norm, q/k/v/out with bias, residual). Arrays are NHWC inside; the API is NCHW like diffusers.
Group norm, convolutions and up/down-sampling are the UNet port's (bdpo_jax.models).

    module, params = load_vae(folder_or_hub_id, subfolder="vae")      # or load_vae_decoder
    images_NHWC = decode(module, params, latents_NCHW, scaling_factor)  # in [0, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bdpo_jax.models import weights
from bdpo_jax.models.norms import GroupNorm
from bdpo_jax.models.resnet import Downsample2D, Upsample2D, conv

VAE_EPS = 1e-6  # every norm of the diffusers VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKL config fields the port uses (diffusers config.json names)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "vae config") -> VAEConfig:
        """From a diffusers AutoencoderKL config dict; unsupported values raise naming the field."""
        for field, allowed in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            for i, kind in enumerate(config.get(field, ())):
                if kind != allowed:
                    raise ValueError(f"{source}: {field}[{i}]={kind!r} is not supported")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"{source}: act_fn={config['act_fn']!r} is not supported")
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(
                f"{source}: _class_name={config['_class_name']!r} is not AutoencoderKL"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if config.get(f.name) is not None:
                value = config[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D with temb_channels=None (the VAE's: no time embedding)."""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        h = GroupNorm(self.groups, VAE_EPS, name="norm1", **kw)(x_BxHxWxC)
        h = conv(self.out_channels, 3, "conv1", **kw)(nn.silu(h))
        h = GroupNorm(self.groups, VAE_EPS, name="norm2", **kw)(h)
        h = conv(self.out_channels, 3, "conv2", **kw)(nn.silu(h))
        x = x_BxHxWxC.astype(self.dtype)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return x + h


class Attention(nn.Module):
    """The VAE mid-block attention: group norm, one head of width C, biases, residual."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        b, h, w, c = x_BxHxWxC.shape
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        y = GroupNorm(self.groups, VAE_EPS, name="group_norm", **kw)(x_BxHxWxC)
        y_BxTxC = y.reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, name=n, **kw)(y_BxTxC) for n in ("to_q", "to_k", "to_v"))
        # [B, T, heads=1, C]; scale 1/sqrt(C) as diffusers' default
        o = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
        o = nn.Dense(c, name="to_out_0", **kw)(o)
        return o.reshape(b, h, w, c) + x_BxHxWxC.astype(self.dtype)


class MidBlock(nn.Module):
    """UNetMidBlock2D of the VAE: resnet, (attention), resnet."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = Attention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """DownEncoderBlock2D: resnets, then a stride-2 conv with diffusers' (0, 1) padding."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, 0, self.dtype, jnp.float32, name="downsamplers_0")(
                x
            )
        return x


class UpDecoderBlock(nn.Module):
    """UpDecoderBlock2D: resnets, then nearest 2x up-sampling and a conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """diffusers autoencoders/vae.py Encoder (double_z): image NHWC -> 2 * latent channels."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=jnp.float32)
        chans, g = cfg.block_out_channels, cfg.norm_num_groups
        x = conv(chans[0], 3, "conv_in", **kw)(x_BxHxWxC)
        for i, out_c in enumerate(chans):
            last = i == len(chans) - 1
            x = DownEncoderBlock(
                out_c, cfg.layers_per_block, g, not last, self.dtype, name=f"down_blocks_{i}"
            )(x)
        x = MidBlock(chans[-1], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        x = nn.silu(GroupNorm(g, VAE_EPS, name="conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """diffusers autoencoders/vae.py Decoder: latents NHWC -> image NHWC in about [-1, 1]."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z_BxHxWxC: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=jnp.float32)
        chans, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        x = conv(chans[0], 3, "conv_in", **kw)(z_BxHxWxC)
        x = MidBlock(chans[0], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, out_c in enumerate(chans):
            last = i == len(chans) - 1
            x = UpDecoderBlock(
                out_c, cfg.layers_per_block + 1, g, not last, self.dtype, name=f"up_blocks_{i}"
            )(x)
        x = nn.silu(GroupNorm(g, VAE_EPS, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, "conv_out", **kw)(x).astype(jnp.float32)


class AutoencoderKL(nn.Module):
    """post_quant_conv + Decoder (`decode`) and Encoder + quant_conv (`encode`), NHWC."""

    config: VAEConfig
    dtype: Any = jnp.float32
    with_encoder: bool = False

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        c = self.config.latent_channels
        self.decoder = Decoder(self.config, self.dtype)
        if self.config.use_post_quant_conv:
            self.post_quant_conv = conv(c, 1, "post_quant_conv", **kw)
        if self.with_encoder:
            self.encoder = Encoder(self.config, self.dtype)
            if self.config.use_quant_conv:
                self.quant_conv = conv(2 * c, 1, "quant_conv", **kw)

    def decode(self, z_BxHxWxC: jax.Array) -> jax.Array:
        if self.config.use_post_quant_conv:
            z_BxHxWxC = self.post_quant_conv(z_BxHxWxC)
        return self.decoder(z_BxHxWxC)

    def encode(self, x_BxHxWxC: jax.Array) -> jax.Array:
        moments = self.encoder(x_BxHxWxC)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return moments.astype(jnp.float32)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Initialises every parameter (decoder, and encoder when with_encoder)."""
        z = self.encode(x_BxHxWxC)[..., : self.config.latent_channels]
        return self.decode(z)


def init_vae_params(module: AutoencoderKL, rng: jax.Array, image_size: int = 16) -> Any:
    """Random params of `module` (shapes only depend on the config)."""
    factor = 2 ** (len(module.config.block_out_channels) - 1)
    if module.with_encoder:
        x = jnp.zeros((1, image_size, image_size, module.config.in_channels))
        return module.init(rng, x)["params"]
    z = jnp.zeros((1, image_size // factor, image_size // factor, module.config.latent_channels))
    return module.init(rng, z, method=AutoencoderKL.decode)["params"]


@functools.partial(jax.jit, static_argnums=(0,))
def _decode_jit(module: AutoencoderKL, params: Any, z_NCHW: jax.Array) -> jax.Array:
    x = module.apply({"params": params}, z_NCHW.transpose(0, 2, 3, 1), method=AutoencoderKL.decode)
    return jnp.clip(x / 2 + 0.5, 0.0, 1.0)


def decode(
    module: AutoencoderKL, params: Any, latents_NCHW: jax.Array, scaling_factor: float
) -> jax.Array:
    """diffusers' `vae.decode(latents / scaling_factor)` then (x / 2 + 0.5).clip(0, 1), as NHWC.

    With latents_mean/latents_std in the VAE config (as SDXL-style pipelines do) the latents are
    first un-normalised: latents * std / scaling_factor + mean.
    """
    z = jnp.asarray(latents_NCHW, jnp.float32)
    cfg = module.config
    if cfg.latents_mean is not None and cfg.latents_std is not None:
        mean = jnp.asarray(cfg.latents_mean, jnp.float32).reshape(1, -1, 1, 1)
        std = jnp.asarray(cfg.latents_std, jnp.float32).reshape(1, -1, 1, 1)
        z = z * std / scaling_factor + mean
    else:
        z = z / scaling_factor
    return _decode_jit(module, params, z)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_jit(module: AutoencoderKL, params: Any, x_NCHW: jax.Array) -> jax.Array:
    m = module.apply({"params": params}, x_NCHW.transpose(0, 2, 3, 1), method=AutoencoderKL.encode)
    return m.transpose(0, 3, 1, 2)


def encode_moments(module: AutoencoderKL, params: Any, images_NCHW: jax.Array) -> jax.Array:
    """latent_dist (mean, logvar) of images in [-1, 1]: [B, 2, C, H, W], logvar clipped to
    [-30, 20] as diffusers' DiagonalGaussianDistribution; unscaled (multiply by scaling)."""
    if not module.with_encoder:
        raise ValueError("this VAE module was built without its encoder (with_encoder=False)")
    moments = _encode_jit(module, params, jnp.asarray(images_NCHW, jnp.float32))
    mean, logvar = jnp.split(moments, 2, axis=1)
    return jnp.stack([mean, jnp.clip(logvar, -30.0, 20.0)], axis=1)


# --- weights: diffusers AutoencoderKL state dict <-> Flax params ------------------------------
# Same name mapping and layouts as the UNet port (bdpo_jax/models/weights.py), plus the renames of
# diffusers' ModelMixin._fix_state_dict_keys_on_load for pre-0.14 VAE attention names.

_DEPRECATED_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}
_ATTENTION_RE = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LINEAR_RE = re.compile(r".*\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _normalise_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Deprecated attention names -> current ones; 1x1-conv attention weights -> linear."""
    out = {}
    for name, value in state_dict.items():
        m = _ATTENTION_RE.match(name)
        if m:
            name = f"{m.group(1)}.{_DEPRECATED_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
        if _LINEAR_RE.match(name) and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[name] = value
    return out


def params_from_state_dict(
    module: AutoencoderKL, state_dict: Mapping[str, np.ndarray], source: str = "state dict"
) -> Any:
    """float32 Flax params of `module` from a diffusers AutoencoderKL state dict (numpy).

    Tensors the module does not use (the encoder and quant_conv when with_encoder=False) are
    ignored; missing, unexpected or wrongly shaped tensors raise a ValueError naming them.
    """
    used = ("decoder.", "post_quant_conv.")
    if module.with_encoder:
        used += ("encoder.", "quant_conv.")
    state = {k: v for k, v in _normalise_state_dict(state_dict).items() if k.startswith(used)}
    abstract = jax.eval_shape(lambda r: init_vae_params(module, r), jax.random.key(0))
    return weights.torch_state_to_params(state, abstract, jnp.float32, source)


def state_dict_from_params(params: Any) -> dict[str, np.ndarray]:
    """diffusers AutoencoderKL tensor names -> numpy arrays (the inverse of the above)."""
    return weights.params_to_torch_state(params)


def load_vae(
    path_or_hub_id: str | os.PathLike,
    subfolder: str | None = None,
    *,
    with_encoder: bool = False,
    dtype: Any = jnp.float32,
) -> tuple[AutoencoderKL, Any]:
    """(module, params) of a diffusers AutoencoderKL folder or hub id (subfolder 'vae' of a
    pipeline); params are float32, `dtype` is the compute dtype."""
    folder = weights._resolve_folder(path_or_hub_id, subfolder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; is this a diffusers VAE folder?")
    config = json.loads(config_path.read_text())
    module = AutoencoderKL(
        VAEConfig.from_diffusers(config, str(config_path)), dtype=dtype, with_encoder=with_encoder
    )
    return module, params_from_state_dict(module, weights.read_state_dict(folder), str(folder))


def load_vae_decoder(
    path_or_hub_id: str | os.PathLike, subfolder: str | None = None, dtype: Any = jnp.float32
) -> tuple[AutoencoderKL, Any]:
    """(module, params) with the decoder and post_quant_conv only."""
    return load_vae(path_or_hub_id, subfolder, with_encoder=False, dtype=dtype)
