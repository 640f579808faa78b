"""BalancedDPO training: `python -m bdpo_jax.train --config configs/tiny.py --workdir W`.

`main` parses flags; `train_and_evaluate(config, workdir)` is the loop (tests call it directly):
data -> model -> sharded state (or the latest checkpoint of WORKDIR) -> jitted steps with a
host-side reference refresh every config.dpo.ref_update_every steps -> metrics, checkpoints.
Any config field can be overridden: `--config.train.steps=12 --config.dpo.beta=2000`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from bdpo_jax import checkpointing, data, metrics_writer, sharding, train_state, train_step

_BATCH_KEYS = (  # host batch fields the step uses ("index" stays on the host)
    "moments_0",
    "moments_1",
    "text_embeds",
    "pooled_text_embeds",
    "add_time_ids",
    "scores",
    "votes",
    "label",
    "margin",
    "human_label",
)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Clear errors for config mistakes that would otherwise fail deep inside the run."""
    if config.data.source == "shards" and not config.data.path:
        raise ValueError(
            "config.data.path is required when config.data.source='shards' "
            "(a folder of shards written by scorers_torch.preprocess)"
        )
    if config.model.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"config.model.prediction_type={config.model.prediction_type!r}: "
            "expected 'epsilon' or 'v_prediction'"
        )
    for name in ("steps", "global_batch_size", "log_every", "checkpoint_every"):
        if int(config.train[name]) < 1:
            raise ValueError(f"config.train.{name} must be >= 1, got {config.train[name]}")
    if int(config.optim.grad_accum_steps) < 1:
        raise ValueError("config.optim.grad_accum_steps must be >= 1")
    if config.dpo.ref_update not in ("copy", "ema"):
        raise ValueError(
            f"config.dpo.ref_update={config.dpo.ref_update!r}: expected 'copy' or 'ema'"
        )


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _initial_state(config, host_params, fns: train_step.StepFunctions) -> train_state.TrainState:
    """A fresh state: random init, loaded diffusers weights, or init_checkpoint's params."""
    key = jax.random.PRNGKey(int(config.seed))
    inits = fns.inits
    if config.model.init_checkpoint:
        params = checkpointing.restore_params(
            config.model.init_checkpoint, inits.abstract.params, inits.shardings.params
        )
        return inits.init_from_params(params, key)
    if host_params is not None:
        return inits.init_from_params(train_state.place_params(host_params, inits), key)
    return inits.init_random(key)


def _check_losses(pending: list[tuple[int, jax.Array]]) -> None:
    """Fetch the losses since the last check; stop at the first non-finite one."""
    values = jax.device_get([loss for _, loss in pending])
    for (step, _), value in zip(pending, values, strict=True):
        metrics_writer.check_finite(step, float(value))
    pending.clear()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
    """Train (or resume) the run of `config` in `workdir`; returns the final state."""
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axis_names)
    global_batch = int(config.train.global_batch_size)
    sharding.check_batch_divisible(global_batch, mesh, int(config.optim.grad_accum_steps))
    rules = sharding.validate_rules(config.mesh.rules)

    dataset, info = data.make_dataset(
        config.data,
        global_batch_size=global_batch,
        seed=int(config.seed),
        label_mode=config.label.mode,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    cfg = train_step.make_step_config(config, info)  # validates the label config
    if abs(float(config.diffusion.vae_scaling_factor) - float(info.vae_scaling_factor)) > 1e-9:
        logging.warning(
            "config.diffusion.vae_scaling_factor=%s differs from the data's %s; using the data's",
            config.diffusion.vae_scaling_factor,
            info.vae_scaling_factor,
        )
    model, unet_cfg, host_params = train_state.build_model(
        config.model,
        latent_shape=info.latent_shape,
        text_shape=info.text_shape,
        pooled_dim=info.pooled_dim,
    )
    fns = train_step.make_step_functions(
        model,
        cfg,
        mesh,
        rules,
        int(config.mesh.fsdp_min_size),
        config.dpo.ref_update,
        float(config.dpo.ref_ema_decay),
    )
    _write_json(os.path.join(workdir, checkpointing.UNET_CONFIG_FILE), unet_cfg)
    config_dict = json.loads(config.to_json_best_effort())
    _write_json(os.path.join(workdir, checkpointing.CONFIG_FILE), config_dict)

    manager = checkpointing.make_manager(
        workdir, int(config.train.keep_checkpoints), bool(config.train.async_checkpoints)
    )
    data_iter = iter(dataset)
    state = checkpointing.restore_latest(manager, fns.inits.abstract, fns.shardings, data_iter)
    if state is None:
        state = _initial_state(config, host_params, fns)
    else:
        logging.info("resumed from %s at step %d", manager.directory, int(state.step))
    del host_params

    consts = train_step.make_consts(info, cfg, float(config.dpo.beta), mesh)
    total = int(config.train.steps)
    start = int(state.step)
    writer = metrics_writer.MetricsWriter(
        workdir,
        total_steps=total,
        start_step=start,
        pairs_per_step=global_batch,
        progress=bool(config.train.progress_bar),
    )
    ref_every = int(config.dpo.ref_update_every)
    pending: list[tuple[int, jax.Array]] = []
    try:
        for step in range(start + 1, total + 1):  # `step` = optimiser steps done after this one
            host_batch = next(data_iter)
            batch = data.to_global_batch(
                {k: host_batch[k] for k in _BATCH_KEYS if k in host_batch}, fns.batch_sharding
            )
            state, metrics = fns.train_step(state, batch, consts)
            pending.append((step, metrics["loss"]))
            if ref_every and step % ref_every == 0:
                state = fns.refresh(state)
            writer.advance(step)
            is_log = step % int(config.train.log_every) == 0 or step == total
            is_ckpt = step % int(config.train.checkpoint_every) == 0 or step == total
            if is_log or is_ckpt:
                _check_losses(pending)  # never save or log past a non-finite loss
            if is_log:
                writer.write(step, jax.device_get(metrics))
            if is_ckpt:
                checkpointing.save(manager, step, state, data_iter, config_dict)
            if int(config.train.sample_every) and step % int(config.train.sample_every) == 0:
                _sample_grid(config, model, state, host_batch, info, workdir, step)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        close_iterator = getattr(data_iter, "close", None)
        if close_iterator is not None:  # stops Grain's worker processes, if any
            close_iterator()
    metrics_writer.plot_curves(workdir)
    return state


@functools.lru_cache(maxsize=2)
def _vae_decoder(path: str, subfolder: str | None):
    from bdpo_jax import vae

    module, params = vae.load_vae_decoder(path, subfolder=subfolder)
    return module, params


def _sample_grid(config, model, state, host_batch, info, workdir: str, step: int) -> None:
    """WORKDIR/samples/step_N.png: the batch's first prompts sampled with the current params."""
    from bdpo_jax import grids

    n = min(4, host_batch["text_embeds"].shape[0])
    text = np.asarray(host_batch["text_embeds"][:n], np.float32)
    uncond = np.repeat(np.asarray(info.empty_text_embeds, np.float32)[None], n, axis=0)
    index = host_batch.get("index", np.arange(n))[:n]
    prompts = [f"record {int(i)}" for i in index]
    if config.data.source == "shards":
        prompts = [
            r["prompt"] for r in data.read_records(config.data.path, [int(i) for i in index])
        ]
    decoder = None
    if info.latent_shape[0] != 3:  # latent model: decode with the VAE
        if config.sample.vae:
            vae_module, vae_params = _vae_decoder(config.sample.vae, None)
        else:
            vae_module, vae_params = _vae_decoder(config.model.pretrained, "vae")
        decoder = (vae_module, vae_params, float(info.vae_scaling_factor))
    added = uncond_added = None
    if info.pooled_dim:
        time_ids = np.asarray(host_batch["add_time_ids"][:n], np.float32)
        added = {
            "text_embeds": np.asarray(host_batch["pooled_text_embeds"][:n], np.float32),
            "time_ids": time_ids,
        }
        uncond_added = {
            "text_embeds": np.repeat(
                np.asarray(info.empty_pooled_text_embeds, np.float32)[None], n, axis=0
            ),
            "time_ids": time_ids,
        }
    path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grids.sample_grid_for_training(
        model,
        state.params,
        text,
        uncond,
        prompts,
        jax.random.PRNGKey(step),
        path,
        config.sample,
        config,
        decoder,
        latent_shape=tuple(info.latent_shape),
        added_cond_kwargs=added,
        uncond_added_cond_kwargs=uncond_added,
    )


def main(argv: list[str]) -> None:
    del argv
    sharding.maybe_initialize_distributed()
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "a configs/*.py file", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, config")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
