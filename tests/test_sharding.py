"""Mesh construction, the rules table, optimizer-state shardings and batch divisibility."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from bdpo_jax import schema, sharding
from bdpo_jax.models.attention import split_over_mesh
from bdpo_jax.schema import ConfigError


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


def test_to_global_batch_on_a_4x2_mesh():
    batch_sharding = sharding.batch_sharding(sharding.make_mesh((4, 2)))
    batch = {
        "moments_0": np.arange(16 * 2 * 3, dtype=np.float16).reshape(16, 2, 3),
        "label": np.arange(16, dtype=np.int8),
    }
    out = sharding.to_global_batch(batch, batch_sharding)
    for key, value in batch.items():
        assert out[key].sharding == batch_sharding and out[key].dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(out[key]), value)
        shards = out[key].addressable_shards
        assert len(shards) == 8 and all(s.data.shape[0] == 2 for s in shards)


def test_distributed_not_initialised_for_single_process(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_NTASKS",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_STEP_NODELIST",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "BDPO_DISTRIBUTED",
    ):
        monkeypatch.delenv(var, raising=False)
    assert sharding.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-4]")
    monkeypatch.setenv("BDPO_DISTRIBUTED", "0")
    assert sharding.maybe_initialize_distributed() is False


_ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}


@pytest.mark.parametrize(
    "environ, expect",
    [
        ({}, None),
        (_ENV, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}),
        (_ENV | {"BDPO_DISTRIBUTED": "0"}, None),
        (_ENV | {"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),  # one process
        ({"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n[1-8]", "SLURM_PROCID": "2"}, {}),
        ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, None),  # a batch script's python, no srun
        ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n1"}, None),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, {}),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {}),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
        ({"BDPO_DISTRIBUTED": "1"}, {}),  # forced: jax's own cluster detection
    ],
)
def test_distributed_launch_from_the_environment(environ, expect):
    assert sharding.distributed_launch(environ) == expect


@pytest.mark.parametrize(
    "environ, match",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_COORDINATOR_ADDRESS set without JAX_NUM_PRO"),
        ({"JAX_NUM_PROCESSES": "2"}, "without JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID"),
        (_ENV | {"JAX_PROCESS_ID": ""}, "without JAX_PROCESS_ID"),
        (_ENV | {"JAX_PROCESS_ID": "4"}, r"JAX_PROCESS_ID=4 must be in \[0, JAX_NUM_PROCESSES=4\)"),
        (_ENV | {"JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID=-1 must be in"),
        (_ENV | {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
        (_ENV | {"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES=0 must be >= 1"),
        ({"BDPO_DISTRIBUTED": "yes"}, "BDPO_DISTRIBUTED='yes' must be 0 or 1"),
    ],
)
def test_half_configured_launch_is_one_clear_error(environ, match, capsys):
    with pytest.raises(ConfigError, match=match):
        sharding.distributed_launch(environ)
    with pytest.raises(SystemExit) as exit_info:  # the train CLI: one line, exit code 2
        schema.run_cli("bdpo_jax.train", lambda: sharding.distributed_launch(environ))
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_jax_cluster_detection_failure_is_a_config_error(monkeypatch):
    def fail(**kwargs):
        raise ValueError("Number of processes must be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(ConfigError, match="set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES"):
        sharding.maybe_initialize_distributed({"OMPI_COMM_WORLD_SIZE": "2"})


@pytest.mark.parametrize("shape", [(1, 8), (4, 2), (8, 1)])
def test_process_batch_rows_single_process_owns_all(shape):
    batch_sharding = sharding.batch_sharding(sharding.make_mesh(shape))
    np.testing.assert_array_equal(sharding.process_batch_rows(batch_sharding, 16), np.arange(16))


def test_process_batch_rows_of_a_host_are_its_devices_rows():
    """A mesh over 4 of the 8 devices stands in for one host's share of a 2-host mesh: with the
    mesh over jax.devices(), host 0 holds the first half of the batch, host 1 the second."""
    devices = jax.devices()
    mesh = sharding.make_mesh((1, 8), devices=devices)
    rows_by_device = {
        d: range(*index[0].indices(16))
        for d, index in sharding.batch_sharding(mesh).devices_indices_map((16,)).items()
    }
    for host in range(2):
        owned = sorted(r for d in devices[4 * host : 4 * host + 4] for r in rows_by_device[d])
        assert owned == list(range(8 * host, 8 * host + 8))
    out = sharding.to_global_batch({"x": np.arange(16.0)}, sharding.batch_sharding(mesh), 16)
    np.testing.assert_array_equal(np.asarray(out["x"]), np.arange(16.0))


# --- the train step on different meshes ------------------------------------------------------


class _Probe(nn.Module):
    """A small conditional denoiser with the UNet's call signature (compiles in ~1 s)."""

    @nn.compact
    def __call__(self, x_NCHW, t_N, text_NxLxD, added_cond_kwargs=None, train=False):
        h = jnp.transpose(x_NCHW, (0, 2, 3, 1))
        t_emb = jnp.sin(t_N.astype(jnp.float32)[:, None] / (1.0 + jnp.arange(16.0))[None] / 100)
        cond = nn.Dense(16)(t_emb) + nn.Dense(16)(text_NxLxD.mean(axis=1))
        h = nn.silu(nn.GroupNorm(4)(nn.Conv(16, (3, 3))(h)) + cond[:, None, None, :])
        h = nn.silu(nn.Conv(16, (3, 3))(h))
        return jnp.transpose(nn.Conv(x_NCHW.shape[1], (3, 3))(h), (0, 3, 1, 2))


def _tiny_setup(config):
    """(DatasetInfo, one host batch, (step_fn, tx, consts) of `train.make_train_step`)."""
    from bdpo_jax import data, train

    ds, info = data.make_dataset(config.data, global_batch_size=8, seed=0, label_mode="majority")
    host_batch = {k: v for k, v in next(iter(ds)).items() if k != "index"}
    # beta 50, not tiny.py's 500: beta/2 multiplies float32 reduction-order differences
    config.dpo.beta = 50.0
    return info, host_batch, lambda model: train.make_train_step(config, info, model)


def _run_on_mesh(step_fn, shardings, consts, host_state, host_batch, mesh, steps=2):
    batch_sharding, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    step = jax.jit(
        step_fn, in_shardings=(shardings, batch_sharding, repl), out_shardings=(shardings, repl)
    )
    state = jax.device_put(host_state, shardings)
    consts = jax.device_put(consts, repl)
    batch = sharding.to_global_batch(host_batch, batch_sharding)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch, consts)
        losses.append(float(metrics["loss"]))
    return losses, state


def _assert_same(results, reference):
    ref_losses, ref_state = results[reference]
    assert abs(ref_losses[0] - math.log(2)) > 1e-3  # the comparison is not trivial
    for name, (losses, state) in results.items():
        np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5, err_msg=name)
        for a, b in zip(
            jax.tree.leaves(jax.device_get(state.params)),
            jax.tree.leaves(jax.device_get(ref_state.params)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def _perturbed_reference(state):
    """A reference unlike the policy, so the loss is not log 2 on every mesh."""
    host = jax.device_get(state)
    return host.replace(ref_params=jax.tree.map(lambda x: x * 0.98, host.ref_params))


def test_step_same_on_one_device_and_meshes_8x1_4x2_1x8():
    """Two full train steps (loss, grads, clip, AdamW) of a probe denoiser: the same losses
    (1e-5) and parameters on 1 device and on the 8-device meshes, its kernels FSDP-sharded."""
    from bdpo_jax import train_state
    from configs import tiny

    info, host_batch, make_train_step = _tiny_setup(tiny.get_config())
    model = _Probe()
    c, h, w = info.latent_shape
    params = model.init(
        jax.random.PRNGKey(0),
        jnp.zeros((1, c, h, w)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, *info.text_shape)),
    )["params"]
    step_fn, tx, consts = make_train_step(model)
    host_state = _perturbed_reference(
        train_state.init_state(model, tx, jax.random.PRNGKey(0), params)
    )
    results = {}
    for name, shape, devices in [
        ("1", (1, 1), jax.devices()[:1]),
        ("8,1", (8, 1), None),
        ("4,2", (4, 2), None),
        ("1,8", (1, 8), None),
    ]:
        mesh = sharding.make_mesh(shape, devices=devices)
        abstract = jax.eval_shape(lambda: host_state)
        shardings = sharding.tree_shardings(abstract, mesh, (), min_size=64)
        results[name] = _run_on_mesh(step_fn, shardings, consts, host_state, host_batch, mesh)
    _assert_same(results, "1")
    specs = {
        s.spec
        for s in jax.tree.leaves(results["1,8"][1].params, is_leaf=None)
        for s in [s.sharding]
    }
    assert P(None, None, None, "fsdp") in specs  # conv kernels sharded over fsdp


def test_tiny_unet_fsdp_1x8_matches_one_device():
    """The real tiny UNet on tiny.py's mesh (1, 8), kernels FSDP-sharded, params + ref + Adam
    states sharded alike, against one device."""
    from bdpo_jax import train_state
    from configs import tiny

    config = tiny.get_config()
    info, host_batch, make_train_step = _tiny_setup(config)
    model, _, _ = train_state.build_model(
        config.model, latent_shape=info.latent_shape, text_shape=info.text_shape, pooled_dim=None
    )
    step_fn, tx, consts = make_train_step(model)
    min_size = int(config.mesh.fsdp_min_size)
    results, host_state = {}, None
    for name, mesh in [
        ("1,8", sharding.make_mesh(config.mesh.shape)),
        ("1", sharding.make_mesh((1, 1), devices=jax.devices()[:1])),
    ]:
        inits = train_state.make_initializers(model, tx, mesh, (), min_size)
        if host_state is None:
            host_state = _perturbed_reference(inits.init_random(jax.random.PRNGKey(0)))
        results[name] = _run_on_mesh(step_fn, inits.shardings, consts, host_state, host_batch, mesh)
    _assert_same(results, "1")
    sharded = results["1,8"][1]
    specs = {x.sharding.spec for x in jax.tree.leaves(sharded.params)}
    assert any("fsdp" in tuple(spec) for spec in specs)
    mu = sharded.opt_state[1][0].mu
    assert jax.tree.map(lambda x: x.sharding.spec, mu) == jax.tree.map(
        lambda x: x.sharding.spec, sharded.params
    )


def test_split_over_mesh_places_a_value_by_the_mesh_it_is_traced_under():
    """Inside traced_under_mesh a value split over heads (its last axis, as XLA propagates a
    column-sharded projection kernel) is re-placed over the batch axes; outside it is left as
    it is (and the math never changes)."""
    mesh = sharding.make_mesh((2, 4))
    x = jax.device_put(
        jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16),
        jax.sharding.NamedSharding(mesh, P(None, sharding.BATCH_AXES)),
    )

    def f(x):
        return split_over_mesh(x * 2.0)

    inside = jax.jit(sharding.traced_under_mesh(f, mesh))(x)
    assert inside.sharding.spec == P(sharding.BATCH_AXES)
    assert inside.sharding.shard_shape(inside.shape) == (1, 16)
    outside = jax.jit(f)(x)
    assert outside.sharding.shard_shape(outside.shape) == (8, 2)  # as propagated from x
    np.testing.assert_array_equal(np.asarray(inside), 2.0 * np.asarray(x))
    np.testing.assert_array_equal(np.asarray(outside), np.asarray(inside))
    eager = jnp.ones(3)
    assert split_over_mesh(eager) is eager  # no mesh: the value itself


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_attention_places_the_chunked_loop_over_the_batch_under_a_mesh(impl):
    """Under the trainer's mesh the chunked loop's q, k, v and output are split over the batch
    axes (as the cuDNN call's: models.attention.SPLIT_OVER_BATCH); without it XLA gathered SDXL's
    FSDP batch into the loop (README, "Real sizes"). The XLA path is left to propagation."""
    from bdpo_jax.models import attention

    mesh = sharding.make_mesh((1, 8))
    module = attention.Attention(heads=2, dim_head=4, attention=impl)
    x = jnp.ones((8, 16, 8))
    params = module.init(jax.random.key(0), x)
    traced = jax.make_jaxpr(sharding.traced_under_mesh(lambda p, x: module.apply(p, x), mesh))
    jaxpr = str(traced(params, x))
    expected = 4 if impl == "chunked" else 0
    assert jaxpr.count("sharding_constraint") == expected
