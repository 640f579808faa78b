"""Sinusoidal timestep embeddings and their MLP.

Mirrors diffusers/models/embeddings.py (get_timestep_embedding, Timesteps, TimestepEmbedding).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_embedding(
    t_B: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding [B, dim] in fp32, exactly diffusers' get_timestep_embedding."""
    half = dim // 2
    exponent_H = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args_BxH = t_B.astype(jnp.float32)[:, None] * jnp.exp(exponent_H)[None, :]
    sin_BxH, cos_BxH = jnp.sin(args_BxH), jnp.cos(args_BxH)
    emb = jnp.concatenate([cos_BxH, sin_BxH] if flip_sin_to_cos else [sin_BxH, cos_BxH], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding with act_fn='silu').

    ``condition_BxC`` (diffusers ``cond_proj_dim``, LCM's guidance embedding) goes through the
    bias-free ``cond_proj`` and is added to the input before linear_1.
    """

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxD: jax.Array, condition_BxC: jax.Array | None = None) -> jax.Array:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if condition_BxC is not None:
            cond_proj = nn.Dense(x_BxD.shape[-1], use_bias=False, name="cond_proj", **dense)
            x_BxD = x_BxD + cond_proj(condition_BxC)
        h = nn.Dense(self.features, name="linear_1", **dense)(x_BxD)
        return nn.Dense(self.features, name="linear_2", **dense)(nn.silu(h))
