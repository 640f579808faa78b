"""ResNet block, down- and up-sampling on NHWC arrays.

Mirrors diffusers/models/resnet.py (ResnetBlock2D, default time embedding norm),
downsampling.py (Downsample2D with conv) and upsampling.py (Upsample2D, nearest + conv).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bdpo_jax.models.norms import GroupNorm


def conv(features: int, kernel: int, name: str, dtype, param_dtype, stride: int = 1, pad=None):
    """A torch-style Conv2d (symmetric padding (k-1)//2 unless ``pad`` is given) on NHWC."""
    p = (kernel - 1) // 2 if pad is None else pad
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """norm1-silu-conv1 (+ time proj) norm2-silu-conv2, plus a 1x1 shortcut when channels change."""

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, temb_BxT: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x_BxHxWxC)
        h = conv(self.out_channels, 3, "conv1", **kw)(nn.silu(h))
        t_BxO = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb_BxT))
        h = h + t_BxO[:, None, None, :]
        h = GroupNorm(self.groups, self.eps, name="norm2", **kw)(h)
        h = conv(self.out_channels, 3, "conv2", **kw)(nn.silu(h))
        x = x_BxHxWxC.astype(self.dtype)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """3x3 stride-2 conv; padding 0 means diffusers' asymmetric (0, 1) zero pad first."""

    channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        if self.padding == 0:
            x_BxHxWxC = jnp.pad(x_BxHxWxC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        layer = conv(
            self.channels, 3, "conv", self.dtype, self.param_dtype, stride=2, pad=self.padding
        )
        return layer(x_BxHxWxC)


def nearest_resize_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source indices of torch's F.interpolate(mode='nearest', size=...) along one axis."""
    scale = size_in / size_out
    return np.minimum(np.floor(np.arange(size_out) * scale).astype(np.int64), size_in - 1)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to ``out_hw``, as diffusers' upsample_size) then a 3x3 conv."""

    channels: int
    out_hw: tuple[int, int] | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        _, h, w, _ = x_BxHxWxC.shape
        if self.out_hw is None or tuple(self.out_hw) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)
        else:
            x = jnp.take(x_BxHxWxC, nearest_resize_indices(h, self.out_hw[0]), axis=1)
            x = jnp.take(x, nearest_resize_indices(w, self.out_hw[1]), axis=2)
        return conv(self.channels, 3, "conv", self.dtype, self.param_dtype)(x)
