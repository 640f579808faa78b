"""Exact resume (synthetic source and real shards), init from a checkpoint or a diffusers folder,
and the checkpoint layout bdpo_jax.export reads."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bdpo_jax import checkpointing, schema, train, train_state
from bdpo_jax.data import synthetic
from configs import tiny

NUM_SCORERS = 4


def _config(steps: int, ref_every: int = 4, **data_overrides):
    config = tiny.get_config()
    config.train.steps = steps
    config.train.checkpoint_every = 100  # only the final step: Orbax saves dominate test time
    config.train.log_every = 5
    config.train.progress_bar = False
    config.dpo.ref_update_every = ref_every  # refreshes before and after the restart
    for key, value in data_overrides.items():
        config.data[key] = value
    return config


def _leaves_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_resume_exact(tmp_path, total=12, stop=7, ref_every=4, **data_overrides):
    """A run stopped after `stop` steps and restarted to `total` equals a straight run."""
    straight = train.train_and_evaluate(
        _config(total, ref_every, **data_overrides), str(tmp_path / "straight")
    )
    workdir = str(tmp_path / "resumed")
    stopped = train.train_and_evaluate(_config(stop, ref_every, **data_overrides), workdir)
    assert int(stopped.step) == stop
    resumed = train.train_and_evaluate(_config(total, ref_every, **data_overrides), workdir)
    assert int(resumed.step) == int(straight.step) == total
    for field in ("params", "ref_params", "opt_state", "rng"):
        _leaves_equal(getattr(straight, field), getattr(resumed, field))
    # the policy moved during the run (the comparison is not trivially true)
    assert not all(
        np.array_equal(p, r)
        for p, r in zip(
            jax.tree.leaves(stopped.params), jax.tree.leaves(resumed.params), strict=True
        )
    )
    return straight


def test_resume_is_exact_on_synthetic_data_and_checkpoint_layout(tmp_path):
    final = _assert_resume_exact(tmp_path)
    workdir = str(tmp_path / "straight")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12"]
    step_dir = os.path.join(workdir, "checkpoints", "12")
    assert {"state", "data_iter", "config"} <= set(os.listdir(step_dir))
    # the data position: one JSON for every process count (not Grain's per-process files)
    files = os.listdir(os.path.join(step_dir, checkpointing.DATA_ITEM))
    assert "metadata" in files and not any(f.startswith("process_") for f in files)
    with open(os.path.join(step_dir, checkpointing.DATA_ITEM, "metadata")) as f:
        assert json.load(f) == {"position": 12 * 8}
    # what bdpo_jax.export does: restore without a target, read params
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(os.path.join(step_dir, "state"))
    assert set(restored) == {"step", "params", "ref_params", "opt_state", "rng"}
    assert int(restored["step"]) == 12
    _leaves_equal(restored["params"], final.params)
    with open(os.path.join(workdir, "unet_config.json")) as f:
        assert json.load(f)["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 12

    # a new run initialised from that checkpoint starts at step 0 with its params
    config = _config(1)
    config.model.init_checkpoint = workdir
    started = train.train_and_evaluate(config, str(tmp_path / "finetune"))
    assert int(started.step) == 1  # warm-up: lr 0 at step 0, so the params are unchanged
    _leaves_equal(started.params, final.params)
    _leaves_equal(started.ref_params, final.params)
    with pytest.raises(FileNotFoundError, match="init_checkpoint"):
        checkpointing.restore_params(str(tmp_path / "nothing"), None, None)


def _write_shards(folder, num_records: int = 40, shards: int = 2) -> str:
    """Tiny shards through the schema codec, with the synthetic data's shapes and scorer names."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(folder, exist_ok=True)
    source = synthetic.SyntheticSource(num_records, (4, 8, 8), (8, 32), NUM_SCORERS, None, seed=5)
    per_shard = num_records // shards
    entries = []
    for s in range(shards):
        name = schema.shard_name(0, s)
        writer = ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
        for i in range(s * per_shard, (s + 1) * per_shard):
            writer.write(schema.encode_record(source[i]))
        writer.close()
        entries.append({"name": name, "num_records": per_shard})
    mean_K, std_K = synthetic.score_stats(NUM_SCORERS)
    names = [f"synthetic_{k}" for k in range(NUM_SCORERS)]
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "scorer_names": names,
        "latent_shape": [4, 8, 8],
        "text_shape": [8, 32],
        "pooled_dim": None,
        "views": 1,
        "vae_scaling_factor": synthetic.VAE_SCALING_FACTOR,
        "score_stats": {
            n: {"mean": float(m), "std": float(s)}
            for n, m, s in zip(names, mean_K, std_K, strict=True)
        },
        "shards": entries,
        "counts": {"written": num_records},
    }
    with open(os.path.join(folder, schema.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    np.savez(
        os.path.join(folder, schema.EMPTY_PROMPT_NAME), text_embeds=np.zeros((8, 32), np.float16)
    )
    return str(folder)


def test_resume_is_exact_on_shards(tmp_path):
    path = _write_shards(tmp_path / "shards")
    # refreshes at 2 and 4 straddle the restart at 3; the shard iterator state is restored
    _assert_resume_exact(tmp_path, total=5, stop=3, ref_every=2, source="shards", path=path)


def test_init_from_a_diffusers_folder(tmp_path):
    """config.model.pretrained = a local diffusers folder, loaded and placed sharded."""
    from bdpo_jax import optim, sharding
    from bdpo_jax.models import save_unet

    config = tiny.get_config()
    info = synthetic.synthetic_dataset_info(config.data)
    model, _, _ = train_state.build_model(
        config.model, latent_shape=info.latent_shape, text_shape=info.text_shape, pooled_dim=None
    )
    mesh = sharding.make_mesh(config.mesh.shape)
    tx, _ = optim.make_optimizer(config.optim, config.train.global_batch_size, config.train.steps)
    inits = train_state.make_initializers(model, tx, mesh)
    params = jax.device_get(inits.init_random(jax.random.PRNGKey(3)).params)
    save_unet(model, params, str(tmp_path / "unet"))

    config.model.unet_config = ""
    config.model.pretrained = str(tmp_path)
    config.model.subfolder = "unet"
    model2, unet_cfg, host_params = train_state.build_model(
        config.model, latent_shape=info.latent_shape, text_shape=info.text_shape, pooled_dim=None
    )
    assert unet_cfg["block_out_channels"] == list(model.spec.block_out_channels)
    inits2 = train_state.make_initializers(model2, tx, mesh)
    state = inits2.init_from_params(
        train_state.place_params(host_params, inits2), jax.random.PRNGKey(0)
    )
    _leaves_equal(state.params, params)
    _leaves_equal(state.ref_params, params)


def test_resume_under_another_config_is_refused_and_keeps_the_run(tmp_path):
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(_config(2), workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        saved = f.read()
    changed = _config(4)  # more steps: a resumable change
    changed.optim.learning_rate = 0.5 * float(changed.optim.learning_rate)
    changed.dpo.beta = 2.0 * float(changed.dpo.beta)
    with pytest.raises(schema.ConfigError) as error:
        train.train_and_evaluate(changed, workdir)
    message = str(error.value)
    assert workdir in message and "dpo.beta, optim.learning_rate" in message
    assert "train.steps" not in message
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == saved  # the run's record still describes its checkpoint
    own = _config(3)  # its own config, more steps, a progress bar: resumable changes
    own.train.progress_bar = True
    resumed = train.train_and_evaluate(own, workdir)
    assert int(resumed.step) == 3 and int(first.step) == 2


def test_changed_fields_compares_shared_fields_only():
    saved = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "old": 0}
    new = {"a": 1, "b": {"c": [1, 3], "d": "x"}, "added": 5}
    assert train.changed_fields(saved, new) == ["b.c"]
    assert train.changed_fields(new, new) == []
