"""Flax Linen port of diffusers' UNet2DConditionModel (SD1.5, SD2.x, SDXL base and refiner,
LCM-distilled (``time_cond_proj_dim``) and Kolors (``encoder_hid_dim``) configs).

Mirrors diffusers/models/unets/unet_2d_condition.py (``__init__`` and ``forward``). The public
call takes and returns NCHW like diffusers; inside, activations are NHWC. Parameter names follow
the torch state dict with ``.<index>`` folded into ``_<index>`` (``down_blocks.0.resnets.1`` ->
``down_blocks_0/resnets_1``), so ``weights.py`` maps them mechanically.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict

from bdpo_jax.models.attention import ATTENTION_CHOICES
from bdpo_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from bdpo_jax.models.norms import GroupNorm
from bdpo_jax.models.presets import complete_config
from bdpo_jax.models.resnet import conv
from bdpo_jax.models.unet_blocks import DownBlock, MidBlock, UpBlock
from bdpo_jax.models.unet_config import UNetSpec, unet_spec, warn_unknown_fields


def _freeze(value: Any) -> Any:
    """Lists to tuples, recursively, so the config is hashable (a static Module field)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, (dict, FrozenDict)):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """The model's config as a plain JSON-ready dict (lists, not tuples)."""
    return _thaw(config)


def _broadcast_timesteps(timesteps: Any, batch: int) -> jax.Array:
    t = jnp.asarray(timesteps)
    if t.ndim == 0 or t.shape == (1,):
        return jnp.broadcast_to(t.reshape(()), (batch,))
    if t.shape != (batch,):
        raise ValueError(f"timesteps has shape {t.shape}; expected () or ({batch},)")
    return t


class UNet2DConditionModel(nn.Module):
    """The SD UNet. ``dtype`` is the compute dtype, ``param_dtype`` the stored one.

    Call: ``model.apply({"params": p}, sample_BxCxHxW, timesteps_B, context_BxLxD,
    added_cond_kwargs=None, train=False, timestep_cond=None)`` -> prediction BxCoxHxW (NCHW,
    compute dtype). ``context_BxLxD`` is ``spec.context_dim`` wide (``encoder_hid_dim`` when the
    config projects it, else ``cross_attention_dim``). For "text_time" configs,
    ``added_cond_kwargs = {"text_embeds": [B, P], "time_ids": [B, N]}`` with
    P + N * addition_time_embed_dim = projection_class_embeddings_input_dim (N = 6 for SDXL,
    5 for its refiner). ``timestep_cond`` [B, time_cond_proj_dim] is the LCM guidance embedding;
    like diffusers, a config with ``time_cond_proj_dim`` also runs without it.
    """

    config: FrozenDict
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        *,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        attention: str = "auto",
    ) -> UNet2DConditionModel:
        """Builds the model from a diffusers config.json dict, reading it as diffusers does.

        Keys that are not diffusers constructor arguments are kept in ``model.config`` (so
        ``save_unet`` writes them back, as diffusers' ``save_pretrained`` does) but ignored,
        with a warning naming them; a value the port does not implement raises
        ``UnsupportedConfigError`` naming the field.
        """
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={attention!r} is not one of {ATTENTION_CHOICES}")
        full = complete_config(config)
        warn_unknown_fields(full)
        unet_spec(full)  # validate now, with errors naming the field
        return cls(_freeze(full), param_dtype, dtype, remat, attention)

    @property
    def spec(self) -> UNetSpec:
        return unet_spec(config_to_dict(self.config))

    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _block_kw(self, spec: UNetSpec, level: int) -> dict:
        return dict(
            heads=spec.num_heads[level],
            transformer_layers=spec.transformer_layers[level],
            groups=spec.norm_num_groups,
            eps=spec.norm_eps,
            use_linear_projection=spec.use_linear_projection,
            attention=self.attention,
            remat=self.remat,
            **self._kw(),
        )

    def _added_embedding(
        self, spec: UNetSpec, added_cond_kwargs: dict | None, emb_BxT: jax.Array
    ) -> jax.Array:
        """The "text_time" embedding: concat(text_embeds, sinusoid(time_ids)) -> add_embedding."""
        if not added_cond_kwargs or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
            raise ValueError(
                "addition_embed_type='text_time' needs added_cond_kwargs with 'text_embeds' "
                "[B, P] and 'time_ids' [B, N] (N = 6 for SDXL, 5 for the SDXL refiner)"
            )
        text_BxP = jnp.asarray(added_cond_kwargs["text_embeds"])
        time_ids_BxN = jnp.asarray(added_cond_kwargs["time_ids"])
        b = text_BxP.shape[0]
        if time_ids_BxN.ndim != 2 or time_ids_BxN.shape[0] != b:
            raise ValueError(f"time_ids has shape {time_ids_BxN.shape}; expected ({b}, N)")
        n_ids = time_ids_BxN.shape[1]
        width = text_BxP.shape[-1] + n_ids * spec.addition_time_embed_dim
        want = spec.projection_class_embeddings_input_dim
        if width != want:
            raise ValueError(
                f"text_embeds width {text_BxP.shape[-1]} + {n_ids} time ids * "
                f"addition_time_embed_dim {spec.addition_time_embed_dim} = {width} != "
                f"projection_class_embeddings_input_dim {want}"
            )
        time_emb = timestep_embedding(
            time_ids_BxN.reshape(-1),
            spec.addition_time_embed_dim,
            flip_sin_to_cos=spec.flip_sin_to_cos,
            freq_shift=spec.freq_shift,
        ).reshape(b, -1)
        add_BxA = jnp.concatenate([text_BxP.astype(jnp.float32), time_emb], axis=-1)
        mlp = TimestepEmbedding(spec.time_embed_dim, name="add_embedding", **self._kw())
        return mlp(add_BxA.astype(emb_BxT.dtype))

    def _timestep_cond(self, spec: UNetSpec, timestep_cond: Any, b: int) -> jax.Array | None:
        if timestep_cond is None:
            return None
        if spec.time_cond_proj_dim is None:
            raise ValueError("timestep_cond was given but the config has time_cond_proj_dim=None")
        cond_BxC = jnp.asarray(timestep_cond)
        if cond_BxC.shape != (b, spec.time_cond_proj_dim):
            raise ValueError(
                f"timestep_cond has shape {cond_BxC.shape}; expected ({b}, "
                f"{spec.time_cond_proj_dim}) (time_cond_proj_dim)"
            )
        return cond_BxC.astype(self.dtype)

    @nn.compact
    def __call__(
        self,
        sample_BxCxHxW: jax.Array,
        timesteps_B: jax.Array | int | float,
        encoder_hidden_states_BxLxD: jax.Array,
        added_cond_kwargs: dict[str, jax.Array] | None = None,
        train: bool = False,
        timestep_cond: jax.Array | None = None,
    ) -> jax.Array:
        del train  # dropout is 0 in every supported config
        spec = self.spec
        kw = self._kw()
        b, c, h, w = sample_BxCxHxW.shape
        if c != spec.in_channels:
            raise ValueError(f"sample has {c} channels; config in_channels={spec.in_channels}")
        x = jnp.transpose(sample_BxCxHxW, (0, 2, 3, 1)).astype(self.dtype)
        if spec.center_input_sample:
            x = 2 * x - 1.0
        context = jnp.asarray(encoder_hidden_states_BxLxD).astype(self.dtype)
        if context.ndim != 3 or context.shape[-1] != spec.context_dim:
            raise ValueError(
                f"encoder_hidden_states has shape {context.shape}; expected (B, L, "
                f"{spec.context_dim})"
            )

        # time
        t_B = _broadcast_timesteps(timesteps_B, b)
        t_emb = timestep_embedding(
            t_B,
            spec.block_out_channels[0],
            flip_sin_to_cos=spec.flip_sin_to_cos,
            freq_shift=spec.freq_shift,
        ).astype(self.dtype)
        cond = self._timestep_cond(spec, timestep_cond, b)
        emb = TimestepEmbedding(spec.time_embed_dim, name="time_embedding", **kw)(t_emb, cond)
        if spec.addition_embed_type == "text_time":
            emb = emb + self._added_embedding(spec, added_cond_kwargs, emb)
        if spec.encoder_hid_dim is not None:  # "text_proj" (Kolors)
            proj = nn.Dense(spec.cross_attention_dim[0], name="encoder_hid_proj", **kw)
            context = proj(context)

        # down
        x = conv(spec.block_out_channels[0], spec.conv_in_kernel, "conv_in", **kw)(x)
        n = len(spec.block_out_channels)
        skips: list[jax.Array] = [x]
        for i, block_type in enumerate(spec.down_block_types):
            block = DownBlock(
                out_channels=spec.block_out_channels[i],
                num_layers=spec.layers_per_block[i],
                has_attention=block_type == "CrossAttnDownBlock2D",
                add_downsample=i < n - 1,
                downsample_padding=spec.downsample_padding,
                name=f"down_blocks_{i}",
                **self._block_kw(spec, i),
            )
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)

        # mid
        if spec.mid_block:
            mid = MidBlock(
                out_channels=spec.block_out_channels[-1],
                num_layers=1,
                has_attention=True,
                output_scale_factor=spec.mid_block_scale_factor,
                name="mid_block",
                **self._block_kw(spec, n - 1),
            )
            x = mid(x, emb, context)

        # up: diffusers forwards the skip's size to the upsampler when H or W is not a
        # multiple of 2**(levels-1); we always pass it, which is the same for exact multiples.
        for i, block_type in enumerate(spec.up_block_types):
            level = n - 1 - i
            num_layers = spec.layers_per_block[level] + 1
            block_skips = tuple(skips[-num_layers:])
            del skips[-num_layers:]
            is_final = i == n - 1
            block = UpBlock(
                out_channels=spec.block_out_channels[level],
                num_layers=num_layers,
                has_attention=block_type == "CrossAttnUpBlock2D",
                add_upsample=not is_final,
                upsample_hw=None if is_final else tuple(skips[-1].shape[1:3]),
                name=f"up_blocks_{i}",
                **self._block_kw(spec, level),
            )
            x = block(x, block_skips, emb, context)

        # out
        x = GroupNorm(spec.norm_num_groups, spec.norm_eps, name="conv_norm_out", **kw)(x)
        x = conv(spec.out_channels, spec.conv_out_kernel, "conv_out", **kw)(nn.silu(x))
        return jnp.transpose(x, (0, 3, 1, 2))


def _dummy_inputs(spec: UNetSpec, batch_size: int) -> tuple:
    """The smallest inputs that trace the whole network (parameter shapes do not depend on H, W,
    nor on how "text_time" splits its projection between text_embeds and time_ids)."""
    side = 2 ** (len(spec.block_out_channels) - 1)
    sample = jnp.zeros((batch_size, spec.in_channels, side, side), jnp.float32)
    context = jnp.zeros((batch_size, 1, spec.context_dim), jnp.float32)
    added = None
    if spec.addition_embed_type == "text_time":
        pooled = spec.projection_class_embeddings_input_dim - spec.addition_time_embed_dim
        added = {
            "text_embeds": jnp.zeros((batch_size, pooled), jnp.float32),
            "time_ids": jnp.zeros((batch_size, 1), jnp.float32),
        }
    cond = None
    if spec.time_cond_proj_dim is not None:
        cond = jnp.zeros((batch_size, spec.time_cond_proj_dim), jnp.float32)
    return sample, jnp.zeros((batch_size,), jnp.int32), context, added, False, cond


def abstract_unet_params(model: UNet2DConditionModel, batch_size: int = 1) -> dict[str, Any]:
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct tree); traces, allocates nothing."""
    inputs = _dummy_inputs(model.spec, batch_size)
    return jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]


def init_unet_params(
    model: UNet2DConditionModel, rng: jax.Array, batch_size: int = 1
) -> dict[str, Any]:
    """Randomly initialised parameters; works under jax.eval_shape (then allocates nothing).

    Kernels are LeCun normal (N(0, 1/fan_in), fan_in = prod of all but the output axis), biases
    zero, norm scales one. All kernels come from one normal draw split into pieces, which keeps
    the XLA compile small (a per-parameter Flax init of the SD UNet compiles for minutes on CPU).
    """
    flat = traverse_util.flatten_dict(abstract_unet_params(model, batch_size))
    total = sum(math.prod(leaf.shape) for p, leaf in flat.items() if p[-1] == "kernel")
    z = jax.random.normal(rng, (total,), jnp.float32)
    # Concrete call: build on the host (a jitted slicing of ~300 leaves compiles slowly);
    # under jit or eval_shape: the same with jnp, traced.
    xp = jnp if isinstance(z, jax.core.Tracer) else np
    if xp is np:
        z = np.asarray(z)
    out, offset = {}, 0
    for path, leaf in flat.items():
        if path[-1] == "kernel":
            size = math.prod(leaf.shape)
            fan_in = math.prod(leaf.shape[:-1])
            value = z[offset : offset + size].reshape(leaf.shape) / np.float32(math.sqrt(fan_in))
            offset += size
        elif path[-1] == "scale":
            value = xp.ones(leaf.shape, jnp.float32)
        else:
            value = xp.zeros(leaf.shape, jnp.float32)
        out[path] = jnp.asarray(value, dtype=leaf.dtype)
    return traverse_util.unflatten_dict(out)
