"""Down, mid and up blocks of the SD UNets (NHWC).

Mirrors diffusers/models/unets/unet_2d_blocks.py: CrossAttnDownBlock2D / DownBlock2D (one class,
``has_attention``), UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D / UpBlock2D. With ``remat`` each
resnet is checkpointed on its own and each transformer layer inside Transformer2DModel, the grain
of diffusers' gradient checkpointing (the ``_gradient_checkpointing_func(resnet, ...)`` calls in
unet_2d_blocks.py, per ``BasicTransformerBlock`` in transformers/transformer_2d.py): the
backward re-runs one layer at a time, never a whole block.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdpo_jax.models.attention import Transformer2DModel
from bdpo_jax.models.remat import layer_class, run_layer
from bdpo_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


class _BlockFields(nn.Module):
    """Fields shared by every block (a plain dataclass base, no behaviour)."""

    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    transformer_layers: int
    groups: int
    eps: float
    use_linear_projection: bool
    attention: str = "auto"
    remat: bool = False  # checkpoint each resnet and each transformer layer (diffusers' grain)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _resnet(self, i: int, scale: float = 1.0) -> ResnetBlock2D:
        return layer_class(ResnetBlock2D, self.remat)(
            self.out_channels, self.groups, self.eps, scale, name=f"resnets_{i}", **self._kw()
        )

    def _run(self, layer: nn.Module, *args: jax.Array) -> jax.Array:
        return run_layer(layer, *args, remat=self.remat)

    def _transformer(self, i: int) -> Transformer2DModel:
        return Transformer2DModel(
            self.heads,
            self.transformer_layers,
            self.groups,
            self.use_linear_projection,
            self.attention,
            self.remat,
            name=f"attentions_{i}",
            **self._kw(),
        )


class DownBlock(_BlockFields):
    """``num_layers`` x (resnet [+ transformer]) then an optional stride-2 conv."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(
        self, x_BxHxWxC: jax.Array, temb_BxT: jax.Array, context_BxSxE: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        x = x_BxHxWxC
        for i in range(self.num_layers):
            x = self._run(self._resnet(i), x, temb_BxT)
            if self.has_attention:
                x = self._transformer(i)(x, context_BxSxE)
            skips.append(x)
        if self.add_downsample:
            down = Downsample2D(
                self.out_channels, self.downsample_padding, name="downsamplers_0", **self._kw()
            )
            x = down(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_BlockFields):
    """resnet, then ``num_layers`` x (transformer, resnet) (UNetMidBlock2DCrossAttn)."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(
        self, x_BxHxWxC: jax.Array, temb_BxT: jax.Array, context_BxSxE: jax.Array
    ) -> jax.Array:
        x = self._run(self._resnet(0, self.output_scale_factor), x_BxHxWxC, temb_BxT)
        for i in range(self.num_layers):
            x = self._transformer(i)(x, context_BxSxE)
            x = self._run(self._resnet(i + 1, self.output_scale_factor), x, temb_BxT)
        return x


class UpBlock(_BlockFields):
    """``num_layers`` x (concat skip, resnet [+ transformer]) then optional upsampling."""

    add_upsample: bool = True
    upsample_hw: tuple[int, int] | None = None

    @nn.compact
    def __call__(
        self,
        x_BxHxWxC: jax.Array,
        skips: tuple[jax.Array, ...],
        temb_BxT: jax.Array,
        context_BxSxE: jax.Array,
    ) -> jax.Array:
        if len(skips) != self.num_layers:
            raise ValueError(f"UpBlock expects {self.num_layers} skips, got {len(skips)}")
        x = x_BxHxWxC
        for i in range(self.num_layers):
            skip = skips[-1 - i].astype(x.dtype)
            x = self._run(self._resnet(i), jnp.concatenate([x, skip], axis=-1), temb_BxT)
            if self.has_attention:
                x = self._transformer(i)(x, context_BxSxE)
        if self.add_upsample:
            up = Upsample2D(self.out_channels, self.upsample_hw, name="upsamplers_0", **self._kw())
            x = up(x)
        return x
