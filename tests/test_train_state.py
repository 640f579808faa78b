"""The training state: sharded initialisers from shapes, loaded params, parameter counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bdpo_jax import schema, sharding, train_state


class _TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(nn.Dense(4, name="body")(x))


def test_param_counts_per_top_level_module_and_total():
    params = _TwoLayers().init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]
    counts = train_state.param_counts(params)
    assert counts == {"total": 5 * 4 + 4 + 4 * 3 + 3, "body": 24, "head": 15}
    abstract = jax.eval_shape(lambda: params)  # shapes only: no arrays needed
    assert train_state.param_counts(abstract) == counts


def test_train_state_round_trips_through_its_checkpoint_layout():
    params = {"w": jnp.ones((2, 2))}
    tx = optax.adamw(1e-3)
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ref_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )
    layout = state.to_dict()
    assert set(layout) == {"step", "params", "ref_params", "opt_state", "rng"}
    again = train_state.TrainState.from_dict(layout)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    shardings = sharding.tree_shardings(
        jax.eval_shape(lambda: state), sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    )
    assert jax.tree.structure(shardings) == jax.tree.structure(state)


def test_dtype_names_are_config_errors():
    assert train_state.dtype_from_name("bfloat16", "config.model.param_dtype") == jnp.bfloat16
    with pytest.raises(schema.ConfigError, match="config.model.param_dtype='fp8'"):
        train_state.dtype_from_name("fp8", "config.model.param_dtype")
