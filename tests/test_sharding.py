"""Mesh construction, the rules table, optimizer-state shardings and batch divisibility."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from bdpo_jax import sharding


def test_eight_fake_devices():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"


@pytest.mark.parametrize("shape,expect", [((-1, 1), (8, 1)), ((4, 2), (4, 2)), ((1, -1), (1, 8))])
def test_make_mesh_shapes(shape, expect):
    mesh = sharding.make_mesh(shape)
    assert tuple(mesh.shape.values()) == expect
    assert mesh.axis_names == ("data", "fsdp")


def test_make_mesh_one_device():
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    assert mesh.devices.size == 1


@pytest.mark.parametrize(
    "shape,match",
    [
        ((3, 1), "needs 3 devices"),
        ((-1, 3), "does not divide"),
        ((-1, -1), "at most one -1"),
        ((8,), "one entry per axis"),
    ],
)
def test_make_mesh_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(shape)


def test_batch_not_divisible_is_a_clear_error():
    mesh = sharding.make_mesh((4, 2))
    with pytest.raises(ValueError, match="global_batch_size=12 must be divisible"):
        sharding.check_batch_divisible(12, mesh)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        sharding.check_batch_divisible(8, mesh, grad_accum_steps=2)
    sharding.check_batch_divisible(16, mesh, grad_accum_steps=2)


def test_default_rule_shards_largest_divisible_axis():
    mesh = sharding.make_mesh((2, 4))
    # largest axis 640 divisible by 4 -> sharded there
    assert sharding.spec_for("a/kernel", (3, 3, 320, 640), (), mesh, 100) == P(
        None, None, None, "fsdp"
    )
    # largest axis (6) not divisible by 4 -> next largest that is (4)
    assert sharding.spec_for("b/kernel", (6, 4), (), mesh, 1) == P(None, "fsdp")
    # small leaves and scalars stay replicated
    assert sharding.spec_for("c/bias", (640,), (), mesh, 1000) == P()
    assert sharding.spec_for("count", (), (), mesh, 0) == P()
    # no divisible axis -> replicated
    assert sharding.spec_for("d/kernel", (3, 5), (), mesh, 1) == P()


def test_rules_first_match_wins_and_explicit_specs():
    mesh = sharding.make_mesh((2, 4))
    rules = (("conv_in", "replicate"), ("proj_out/kernel$", "fsdp,None"), ("kernel", "fsdp"))
    assert sharding.spec_for("conv_in/kernel", (3, 3, 4, 320), rules, mesh, 1) == P()
    assert sharding.spec_for("x/proj_out/kernel", (320, 640), rules, mesh, 1) == P("fsdp", None)
    assert sharding.spec_for("y/kernel", (320, 640), rules, mesh, 1) == P(None, "fsdp")
    with pytest.raises(ValueError, match="does not divide"):
        sharding.spec_for("x/proj_out/kernel", (322, 640), rules, mesh, 1)
    with pytest.raises(ValueError, match="bad regex"):
        sharding.validate_rules([("(", "fsdp")])
    with pytest.raises(ValueError, match="pairs"):
        sharding.validate_rules([("a", "b", "c")])


def test_optimizer_state_sharded_like_params():
    mesh = sharding.make_mesh((1, 8))
    params = {"down": {"kernel": jnp.zeros((16, 64))}, "norm": {"scale": jnp.zeros((64,))}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    abstract_opt = jax.eval_shape(tx.init, params)
    p_sh = sharding.tree_shardings(params, mesh, (), min_size=128)
    o_sh = sharding.tree_shardings(abstract_opt, mesh, (), min_size=128)
    assert p_sh["down"]["kernel"].spec == P(None, "fsdp")
    assert p_sh["norm"]["scale"].spec == P()
    adam = o_sh[1][0]
    assert adam.mu["down"]["kernel"].spec == p_sh["down"]["kernel"].spec
    assert adam.nu["down"]["kernel"].spec == p_sh["down"]["kernel"].spec
    assert adam.count.spec == P()
    # an explicit rule on the param path applies to the optimizer moments too
    rules = (("down/kernel", "fsdp,None"),)
    o_sh = sharding.tree_shardings(abstract_opt, mesh, rules, min_size=128)
    assert o_sh[1][0].mu["down"]["kernel"].spec == P("fsdp", None)


def test_batch_sharding_places_rows_over_all_devices():
    mesh = sharding.make_mesh((4, 2))
    x = jax.device_put(np.arange(16.0).reshape(16, 1), sharding.batch_sharding(mesh))
    assert len(x.addressable_shards) == 8
    assert all(s.data.shape == (2, 1) for s in x.addressable_shards)


def test_distributed_not_initialised_for_single_process(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "BDPO_DISTRIBUTED",
    ):
        monkeypatch.delenv(var, raising=False)
    assert sharding.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("BDPO_DISTRIBUTED", "0")
    assert sharding.maybe_initialize_distributed() is False
