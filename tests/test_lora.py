"""LoRA: targets and counts, peft's init, the merge, the adapters-only step and its reference,
checkpoints without the base, bit-identical resume, and a trained effect (bdpo_jax.lora and the
trainer's LoRA path)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from bdpo_jax import (
    checkpointing,
    data,
    export,
    lora,
    metrics_writer,
    schema,
    sharding,
    train,
    train_state,
)
from bdpo_jax.models import UNet2DConditionModel, init_unet_params, load_unet, presets
from configs import tiny


def _model():
    return UNet2DConditionModel.from_config(presets.tiny_unet_config("sd15"))


def _spec(rank=4, alpha=0.0, include_ff=False, targets=lora.ATTENTION_TARGETS):
    cfg = ml_collections.ConfigDict(
        dict(rank=rank, alpha=alpha, targets=tuple(targets), include_ff=include_ff)
    )
    return lora.spec_from_config(cfg)


@pytest.fixture(scope="module")
def base():
    return init_unet_params(_model(), jax.random.PRNGKey(0))


def test_targets_and_adapter_counts_by_hand(base):
    """Tiny SD1.5 UNet (channels 32, 64; text width 32): transformer blocks at C = 32 (down 1,
    up 2) and C = 64 (mid 1). Per block and rank r: attn1's four C x C projections, 8 C r;
    attn2's to_q and to_out C x C, 4 C r, and to_k, to_v 32 x C, 2 (32 + C) r."""
    assert tiny.get_config().lora.rank == 0  # full fine-tuning by default
    assert lora.spec_from_config(tiny.get_config().lora) is None
    spec = _spec(rank=4)
    assert spec.scale == 1.0  # alpha 0 = rank
    paths = lora.target_paths(base, spec)
    assert len(paths) == 4 * 2 * 4
    names = {lora.module_name(p) for p in paths}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0" in names
    per_block = {c: 8 * c + 4 * c + 2 * (32 + c) for c in (32, 64)}
    expected = 4 * (3 * per_block[32] + per_block[64])
    assert expected == 9984
    assert lora.count(lora.abstract_adapters(base, spec, jnp.float32)) == expected

    ff = _spec(rank=4, include_ff=True)
    assert len(lora.target_paths(base, ff)) == 4 * 2 * 4 + 4 * 2
    assert _spec(rank=8, alpha=4).scale == 0.5
    with pytest.raises(schema.ConfigError, match=r"\['to_z'\]: no linear layer"):
        lora.target_paths(base, _spec(targets=("to_q", "to_z")))
    with pytest.raises(schema.ConfigError, match="proj_in .* is a conv"):
        lora.target_paths(base, _spec(targets=("proj_in",)))  # SD1.5's 1x1 convs
    with pytest.raises(schema.ConfigError, match="rank must be >= 0"):
        _spec(rank=-1)


def test_init_is_peft_and_merge_is_the_base_then_w_plus_scaled_ab(base):
    spec = _spec(rank=4, alpha=8)
    adapters = lora.init_adapters(jax.random.PRNGKey(3), base, spec, jnp.float32)
    flat_a = traverse_util.flatten_dict(adapters)
    for path, x in flat_a.items():
        if path[-1] == lora.B:
            assert not np.any(np.asarray(x))  # B = 0
        else:  # A ~ U(-1/sqrt(in), 1/sqrt(in)), filling the range
            bound = 1 / math.sqrt(x.shape[0])
            assert np.abs(x).max() <= bound and np.abs(x).max() > 0.5 * bound
    merged = lora.merge(base, adapters, spec.scale)
    jax.tree.map(np.testing.assert_array_equal, merged, base)  # step 0: the base, bit for bit

    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), adapters)
    merged = traverse_util.flatten_dict(lora.merge(base, adapters, spec.scale))
    flat_base = traverse_util.flatten_dict(base)
    layer = ("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "to_k")
    a, b = (np.asarray(adapters_leaf(adapters, layer, n), np.float64) for n in (lora.A, lora.B))
    want = np.asarray(flat_base[layer + ("kernel",)], np.float64) + 2.0 * a @ b
    np.testing.assert_allclose(merged[layer + ("kernel",)], want, rtol=1e-5, atol=1e-6)
    untouched = ("mid_block", "attentions_0", "proj_in", "kernel")
    assert merged[untouched] is flat_base[untouched]


def adapters_leaf(adapters, layer, name):
    return traverse_util.flatten_dict(adapters)[layer + (name,)]


def _step_setup(**overrides):
    config = tiny.get_config()
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    ds, info = data.make_dataset(config.data, global_batch_size=8, seed=0, label_mode="majority")
    batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items() if k in schema.BATCH_FIELDS}
    model = UNet2DConditionModel.from_config(
        train_state.resolve_unet_config(
            config.model.unet_config,
            latent_shape=info.latent_shape,
            text_shape=info.text_shape,
            pooled_dim=None,
        )
    )
    step_fn, tx, consts = train.make_train_step(config, info, model)
    return config, model, batch, step_fn, tx, jax.tree.map(jnp.asarray, consts)


def test_lora_step_trains_adapters_only_and_its_reference_is_base_or_base_plus_copy():
    """The LoRA step is the full step on the merged params, with the gradient of the adapters
    only; its reference is the base alone (ref_update_every = 0) or base + ref adapters."""
    model = UNet2DConditionModel.from_config(presets.tiny_unet_config("sd15"))
    base = init_unet_params(model, jax.random.PRNGKey(0))
    spec = _spec(rank=4)
    rng = np.random.default_rng(1)

    def perturbed(tree, s):
        return jax.tree.map(lambda x: x + s * rng.standard_normal(x.shape, np.float32), tree)

    results = {}
    for every in (0, 10):
        config, _, batch, step_fn, tx, consts = _step_setup(
            lora__rank=4, dpo__ref_update_every=every, optim__warmup_steps=0
        )
        state = train_state.init_lora_state(base, spec, tx, jax.random.PRNGKey(2))
        state = state.replace(
            params=perturbed(state.params, 0.05), ref_params=perturbed(state.ref_params, 0.05)
        )
        new, metrics = jax.jit(step_fn)(state, batch, consts, base)
        results[every] = (state, new, metrics)
        # adapters only: params, gradient-driven update and optimizer state
        assert jax.tree.structure(new.params) == jax.tree.structure(state.params)
        shapes = {x.shape for x in jax.tree.leaves(state.params)}
        assert all(x.shape in shapes | {()} for x in jax.tree.leaves(new.opt_state))
        assert not all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True)
        )
        jax.tree.map(np.testing.assert_array_equal, new.ref_params, state.ref_params)

    # the same step on full params: policy = base + adapters; reference = base, or base + copy
    _, _, batch, full_fn, full_tx, consts = _step_setup(optim__warmup_steps=0)
    for every, ref_is in ((0, "base"), (10, "merged")):
        state, _, metrics = results[every]
        policy = lora.merge(base, state.params, spec.scale)
        ref = base if ref_is == "base" else lora.merge(base, state.ref_params, spec.scale)
        full = train_state.TrainState(
            step=state.step,
            params=policy,
            ref_params=ref,
            opt_state=full_tx.init(policy),
            rng=state.rng,
        )
        _, want = jax.jit(full_fn)(full, batch, consts)
        for key in ("loss", "model_mse", "ref_mse", "implicit_accuracy"):
            np.testing.assert_allclose(metrics[key], want[key], rtol=2e-5, err_msg=key)
    assert not np.isclose(results[0][2]["ref_mse"], results[10][2]["ref_mse"])


def _lora_config(steps, **overrides):
    config = tiny.get_config()
    config.lora.rank = 4
    config.train.steps = steps
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.progress_bar = False
    config.train.async_checkpoints = False
    config.dpo.ref_update_every = 2  # BalancedDPO's refresh: ref adapters <- adapters
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def test_lora_run_checkpoints_adapters_only_and_resumes_bit_identically(tmp_path):
    straight = train.train_and_evaluate(_lora_config(4), str(tmp_path / "a"))
    rows = metrics_writer.read_metrics(str(tmp_path / "a"))
    # policy = reference = base at step 0: log 2 (up to the ~1 ulp by which XLA's policy forward,
    # which keeps residuals, differs from the reference's; see test_train_step)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["model_mse"] == pytest.approx(rows[0]["ref_mse"], rel=1e-6)

    # the checkpoint holds adapters (the largest 64 x 4), never a base-sized array (the tiny
    # base has kernels up to 3 x 3 x 64 x 64); its params are the adapter tree
    state_dir = tmp_path / "a" / "checkpoints" / "4" / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        meta = checkpointer.metadata(state_dir)
    meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    sizes = [int(np.prod(m.shape)) for m in jax.tree.leaves(meta)]
    assert len(sizes) > 100 and max(sizes) == 64 * 4
    saved = checkpointing.restore_params(tmp_path / "a")
    assert {p[-1] for p in traverse_util.flatten_dict(saved)} == {lora.A, lora.B}
    assert lora.count(saved) == 9984

    train.train_and_evaluate(_lora_config(2), str(tmp_path / "b"))
    resumed = train.train_and_evaluate(_lora_config(4), str(tmp_path / "b"))
    assert int(resumed.step) == 4
    for got, want in ((resumed.params, straight.params), (resumed.ref_params, straight.ref_params)):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, straight.opt_state)
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "4")

    # export --merge rebuilds the frozen base from unet_config + seed: the trainer's, bit for bit
    config = _lora_config(4)
    inits = train_state.make_initializers(
        _model(),
        optax.sgd(0.0),
        sharding.make_mesh(config.mesh.shape),
        (),
        int(config.mesh.fsdp_min_size),
        lora_spec=lora.spec_from_config(config.lora),
        base_dtype=jnp.float32,
    )
    trained_base = jax.device_get(inits.base.init_random(jax.random.PRNGKey(int(config.seed))))
    workdir = tmp_path / "a"
    run_config = json.loads((workdir / checkpointing.CONFIG_FILE).read_text())
    unet_config = json.loads((workdir / checkpointing.UNET_CONFIG_FILE).read_text())
    rebuilt = export.lora_base_params(run_config, unet_config)
    jax.tree.map(np.testing.assert_array_equal, rebuilt, trained_base)
    out = export.export(workdir, tmp_path / "merged", merge=True)
    _, merged = load_unet(str(out))
    want = lora.merge(trained_base, jax.device_get(straight.params), 1.0)
    jax.tree.map(np.testing.assert_array_equal, merged, want)


def test_lora_config_errors():
    with pytest.raises(schema.ConfigError, match="ref_update='ema' with config.lora.rank"):
        train.validate_config(_lora_config(2, dpo__ref_update="ema"))


def test_lora_dpo_moves_the_preference_margin_on_its_training_pairs():
    """A few dozen LoRA DPO steps (large lr, reference = base) on one batch of pairs: on those
    pairs, under fixed noise and timesteps, the loss falls from log 2, the implicit accuracy
    rises, and the policy's mse gap moves in the label's direction."""
    config, model, batch, step_fn, tx, consts = _step_setup(
        lora__rank=8,
        dpo__ref_update_every=0,
        dpo__proportion_empty_prompts=0.0,
        optim__learning_rate=3e-3,
        optim__warmup_steps=0,
        optim__weight_decay=0.0,
    )
    base = init_unet_params(model, jax.random.PRNGKey(0))
    spec = lora.spec_from_config(config.lora)
    state = train_state.init_lora_state(base, spec, tx, jax.random.PRNGKey(2))
    step = jax.jit(step_fn)
    eval_rng = jax.random.PRNGKey(123)

    @jax.jit
    def evaluate(adapters):  # the step's metrics on the same pairs, noise and timesteps each time
        probe = state.replace(params=adapters, rng=eval_rng, step=jnp.zeros((), jnp.int32))
        return step_fn(probe, batch, consts, base)[1]

    before = evaluate(state.params)
    for _ in range(30):
        state, _ = step(state, batch, consts, base)
    after = evaluate(state.params)
    print({k: (float(before[k]), float(after[k])) for k in ("loss", "implicit_accuracy")})
    assert float(before["loss"]) == pytest.approx(math.log(2), abs=1e-4)
    assert float(after["loss"]) < 0.6
    assert float(after["implicit_accuracy"]) >= 0.75
    # model_diff - ref_diff is the policy's (mse_w - mse_l) gap relative to the reference:
    # negative means the preferred image became relatively more likely
    assert float(after["model_diff"] - after["ref_diff"]) < 0
