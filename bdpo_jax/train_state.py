"""The training state (one pytree) and where the UNet and its first weights come from.

Shapes first (nanodo): `jax.eval_shape` of the init gives the abstract state, `sharding`
turns it into NamedShardings, and `jax.jit(init, out_shardings=...)` materialises it already
sharded, so SD-sized models are never built on one device first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from bdpo_jax import lora, sharding
from bdpo_jax.models.dtypes import dtype_from_name  # config.model.param_dtype / compute_dtype
from bdpo_jax.schema import ConfigError

Params = Mapping[str, Any]  # a Flax params tree: {module name: {... : jax.Array}}


@flax.struct.dataclass
class TrainState:
    """step: optimiser steps done; rng: base key (per-step keys are fold_in(rng, step))."""

    step: jax.Array
    params: Params
    ref_params: Params
    opt_state: optax.OptState
    rng: jax.Array

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint layout: {"step", "params", "ref_params", "opt_state", "rng"}."""
        return {
            "step": self.step,
            "params": self.params,
            "ref_params": self.ref_params,
            "opt_state": self.opt_state,
            "rng": self.rng,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in ("step", "params", "ref_params", "opt_state", "rng")})


def resolve_unet_config(
    spec: str,
    *,
    latent_shape: Sequence[int],
    text_shape: Sequence[int],
    pooled_dim: int | None,
) -> dict[str, Any]:
    """A diffusers UNet config dict from config.model.unet_config.

    "tiny:<family>" -> presets.tiny_unet_config sized to the data (channels, latent size, text
    width); a name of presets.REAL_CONFIGS ("sd15", "sd21", "sdxl", "sdxl_refiner", "lcm_sd15",
    "kolors") -> that published config; otherwise a config.json path (or a folder holding one).
    """
    from bdpo_jax.models import presets

    if spec.startswith("tiny:"):
        family = spec.split(":", 1)[1]
        cfg = dict(
            presets.tiny_unet_config(
                family,
                in_channels=int(latent_shape[0]),
                sample_size=int(latent_shape[1]),
                cross_attention_dim=int(text_shape[1]),
            )
        )
        if cfg.get("addition_embed_type") == "text_time":
            if not pooled_dim:
                raise ConfigError(
                    f"config.model.unet_config={spec!r} needs pooled text embeddings; the data "
                    "has none (set data.synthetic_pooled_dim for synthetic data)"
                )
            num_time_ids = (  # the refiner conditions on 5 time ids (aesthetic score)
                presets.REFINER_NUM_TIME_IDS if family == "sdxl_refiner" else presets.NUM_TIME_IDS
            )
            cfg["projection_class_embeddings_input_dim"] = presets.sdxl_projection_dim(
                int(pooled_dim), int(cfg["addition_time_embed_dim"]), num_time_ids
            )
        return cfg
    if spec in presets.REAL_CONFIGS:
        return dict(presets.real_unet_config(spec))
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ConfigError(
            f"config.model.unet_config={spec!r}: not 'tiny:<family>', one of "
            f"{list(presets.REAL_CONFIGS)} nor an existing config.json ({path} not found)"
        )
    with open(path) as f:
        return json.load(f)


def build_model(
    model_config: ml_collections.ConfigDict,
    *,
    latent_shape: Sequence[int],
    text_shape: Sequence[int],
    pooled_dim: int | None,
) -> tuple[nn.Module, dict[str, Any], Params | None]:
    """(Flax UNet, its diffusers config dict, host params or None for a random init).

    config.model.unet_config set -> random init from that config; else load_unet(pretrained,
    subfolder) from a local diffusers folder or a hub id (weights returned as host arrays).
    """
    from bdpo_jax.models import UNet2DConditionModel, load_unet
    from bdpo_jax.models.unet import config_to_dict

    kwargs = dict(
        param_dtype=dtype_from_name(model_config.param_dtype, "config.model.param_dtype"),
        dtype=dtype_from_name(model_config.compute_dtype, "config.model.compute_dtype"),
        remat=bool(model_config.remat),
        attention=model_config.attention,
    )
    if model_config.unet_config:
        unet_cfg = resolve_unet_config(
            model_config.unet_config,
            latent_shape=latent_shape,
            text_shape=text_shape,
            pooled_dim=pooled_dim,
        )
        model = UNet2DConditionModel.from_config(unet_cfg, **kwargs)
        return model, config_to_dict(model.config), None
    if not model_config.pretrained:
        raise ConfigError(
            "set config.model.pretrained (hub id or folder) or config.model.unet_config"
        )
    model, params = load_unet(
        model_config.pretrained,
        subfolder=model_config.subfolder or None,
        dtype=kwargs["param_dtype"],
        compute_dtype=kwargs["dtype"],
        remat=kwargs["remat"],
        attention=kwargs["attention"],
    )
    unet_cfg = config_to_dict(model.config)
    return model, unet_cfg, params


def unet_init_key(key: jax.Array) -> jax.Array:
    """The key of a random UNet init from the run's PRNGKey(config.seed): a fully fine-tuned
    run's initial params and a LoRA run's frozen base are the same draw."""
    return jax.random.fold_in(key, 0)


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    key: jax.Array,
    params: Params | None = None,
) -> TrainState:
    """The initial state from a PRNGKey (pure: traced under eval_shape and jit).

    params None -> a random init; ref_params is a copy of params; rng is the base key of the
    per-step keys.
    """
    from bdpo_jax.models import init_unet_params

    if params is None:
        params = init_unet_params(model, unet_init_key(key))
    return _state(params, tx, key)


def _state(params: Params, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ref_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=jax.random.fold_in(key, 1),
    )


def init_lora_state(
    abstract_base: Params,
    spec: lora.LoraSpec,
    tx: optax.GradientTransformation,
    key: jax.Array,
    dtype: Any = jnp.float32,
) -> TrainState:
    """The initial state of a LoRA run: params, ref_params (a copy) and the optimizer state are
    adapter trees (`lora.init_adapters`: the adapted model equals the base); the base's values
    are not needed, only its shapes."""
    adapters = lora.init_adapters(jax.random.fold_in(key, 2), abstract_base, spec, dtype)
    return _state(adapters, tx, key)


class FrozenBase(NamedTuple):
    """A LoRA run's frozen UNet params: an input of the step, never donated nor checkpointed."""

    abstract: Params  # jax.ShapeDtypeStruct leaves in the base dtype (the compute dtype)
    shardings: Params  # NamedSharding leaves, by the rules params would have
    init_random: Callable[[jax.Array], Params]  # PRNGKey(seed) -> the random init, sharded


class Initializers(NamedTuple):
    """Shapes first: the abstract state, its shardings, and jitted sharded initialisers."""

    abstract: TrainState  # jax.ShapeDtypeStruct leaves
    shardings: TrainState  # NamedSharding leaves: params, ref_params, opt_state by the same rules
    init_random: Callable[[jax.Array], TrainState]  # key -> state, random params, sharded
    init_from_params: Callable[[Params, jax.Array], TrainState] | None  # None for LoRA
    base: FrozenBase | None = None  # LoRA: the frozen base (params are then adapters)


def make_initializers(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Sequence[tuple[str, str]] = (),
    min_size: int = 2**18,
    lora_spec: lora.LoraSpec | None = None,
    base_dtype: Any = None,
) -> Initializers:
    """jax.eval_shape -> shardings -> jax.jit(init, out_shardings=...): no full-size host copy.

    With `lora_spec` the state holds adapters and `base` describes the frozen UNet params, kept
    in `base_dtype` (default: the model's param dtype).
    """
    key = jax.random.PRNGKey(0)
    repl = sharding.replicated(mesh)
    if lora_spec is not None:
        from bdpo_jax.models import init_unet_params

        dtype = jnp.dtype(base_dtype or model.param_dtype)

        def base_init(k):
            params = init_unet_params(model, unet_init_key(k))
            return jax.tree.map(lambda x: x.astype(dtype), params)

        abstract_base = jax.eval_shape(base_init, key)
        base_shardings = sharding.tree_shardings(abstract_base, mesh, rules, min_size)
        base = FrozenBase(
            abstract_base,
            base_shardings,
            jax.jit(base_init, in_shardings=(repl,), out_shardings=base_shardings),
        )

        def init(k):
            return init_lora_state(abstract_base, lora_spec, tx, k, model.param_dtype)

        abstract = jax.eval_shape(init, key)
        shardings = sharding.tree_shardings(abstract, mesh, rules, min_size)
        init_random = jax.jit(init, in_shardings=(repl,), out_shardings=shardings)
        return Initializers(abstract, shardings, init_random, None, base)
    abstract = jax.eval_shape(lambda k: init_state(model, tx, k), key)
    shardings = sharding.tree_shardings(abstract, mesh, rules, min_size)
    init_random = jax.jit(
        lambda k: init_state(model, tx, k), in_shardings=(repl,), out_shardings=shardings
    )
    init_from_params = jax.jit(
        lambda p, k: init_state(model, tx, k, p),
        in_shardings=(shardings.params, repl),
        out_shardings=shardings,
    )
    return Initializers(abstract, shardings, init_random, init_from_params)


def place_params(host_params: Params, inits: Initializers | FrozenBase) -> Params:
    """Loaded host weights cast to the abstract params' dtypes and placed sharded: the state's
    params of `Initializers`, or a LoRA run's `FrozenBase`."""
    if isinstance(inits, Initializers):
        abstract, shardings = inits.abstract.params, inits.shardings.params
    else:
        abstract, shardings = inits.abstract, inits.shardings
    return jax.tree.map(
        lambda x, a, s: jax.device_put(np.asarray(x, dtype=a.dtype), s),
        host_params,
        abstract,
        shardings,
    )


def param_counts(params: Params) -> dict[str, int]:
    """Parameter count per top-level module (e.g. 'down_blocks_0') and 'total' (works on the
    abstract params of `Initializers.abstract` too)."""
    counts = {
        name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub))
        for name, sub in params.items()
    }
    return {"total": sum(counts.values()), **counts}
