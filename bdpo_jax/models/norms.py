"""Group and layer normalisation with statistics in fp32, matching torch.nn.GroupNorm/LayerNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def _last_axis(v_C: jax.Array, ndim: int) -> jax.Array:
    """fp32 [C] as [1, ..., 1, C] of rank `ndim` (explicit broadcasting: no rank promotion)."""
    return v_C.astype(jnp.float32).reshape((1,) * (ndim - 1) + v_C.shape)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on channels-last input: contiguous channel groups, biased variance."""

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        c = x_BxHxWxC.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels not divisible by {self.num_groups} groups")
        scale_C = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias_C = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        x = x_BxHxWxC.astype(jnp.float32)
        grouped = x.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        mean = grouped.mean(axis=axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = y * _last_axis(scale_C, y.ndim) + _last_axis(bias_C, y.ndim)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis with affine parameters."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        d = x_BxTxD.shape[-1]
        scale_D = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias_D = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x = x_BxTxD.astype(jnp.float32)
        mean = x.mean(axis=-1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * _last_axis(scale_D, y.ndim) + _last_axis(bias_D, y.ndim)
        return y.astype(self.dtype)
