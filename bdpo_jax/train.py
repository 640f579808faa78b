"""BalancedDPO training: `python -m bdpo_jax.train --config configs/tiny.py --workdir W`.

`main` parses flags; `train_and_evaluate(config, workdir)` is the loop (tests call it directly):
data -> model -> the step's parts built once from the config (optimizer, label function, noise
schedule, loss; `make_train_step`) -> one jitted step with explicit shardings and a donated
state -> sharded state (or the latest checkpoint of WORKDIR) -> steps, with a host-side
reference refresh every config.dpo.ref_update_every steps -> metrics (fetched one step late),
checkpoints, sample grids. Any config field can be overridden:
`--config.train.steps=12 --config.dpo.beta=2000`. A user's mistake (a flag, a config value, a
missing file) ends the command with one line on stderr and exit code 2; `--debug` or
BDPO_DEBUG=1 shows its traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from bdpo_jax import (
    checkpointing,
    compile_options,
    data,
    grids,
    host_memory,
    labels,
    lora,
    metrics_writer,
    optim,
    schedules,
    schema,
    sharding,
    train_state,
    train_step,
)
from bdpo_jax import loss as loss_lib
from bdpo_jax.models.dtypes import dtype_from_name
from bdpo_jax.schema import ConfigError
from bdpo_jax.train_state import TrainState

_ABS_INSIDE_WARN = 0.01  # median |inside| at policy == reference above which the run warns
# (state, batch, consts[, base]) -> (state, metrics): `train_step.train_step` with its parts
# bound; a LoRA run also passes the frozen base params
StepFn = Callable[..., tuple[TrainState, train_step.Metrics]]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Clear errors for config mistakes that would otherwise fail deep inside the run."""
    if config.data.source == "shards" and not config.data.path:
        raise ConfigError(
            "config.data.path is required when config.data.source='shards' "
            "(a folder of shards written by scorers_torch.preprocess)"
        )
    if config.model.prediction_type not in schedules.PREDICTION_TYPES:
        raise ConfigError(
            f"config.model.prediction_type={config.model.prediction_type!r}: expected one of "
            f"{schedules.PREDICTION_TYPES}"
        )
    snr_gamma = float(config.diffusion.snr_gamma)
    if snr_gamma < 0 or (snr_gamma > 0 and config.label.mode != "sft"):
        raise ConfigError(
            f"config.diffusion.snr_gamma={snr_gamma}: must be >= 0, and > 0 only with "
            f"config.label.mode='sft' (got {config.label.mode!r}; the DPO loss is unweighted)"
        )
    weighting = str(config.diffusion.snr_weighting)
    if weighting not in schedules.SNR_WEIGHTINGS:
        raise ConfigError(
            f"config.diffusion.snr_weighting={weighting!r}: expected one of "
            f"{schedules.SNR_WEIGHTINGS}"
        )
    if weighting == "truncated_snr" and 0 < snr_gamma < 1:
        raise ConfigError(
            f"config.diffusion.snr_gamma={snr_gamma}: the truncated SNR weights clip(SNR, 1, "
            "gamma) need gamma >= 1"
        )
    loss_type = str(config.diffusion.loss_type)
    if loss_type not in loss_lib.SFT_LOSS_TYPES:
        raise ConfigError(
            f"config.diffusion.loss_type={loss_type!r}: expected one of {loss_lib.SFT_LOSS_TYPES}"
        )
    if loss_type != "l2" and config.label.mode != "sft":
        raise ConfigError(
            f"config.diffusion.loss_type={loss_type!r}: other than 'l2' only with "
            f"config.label.mode='sft' (got {config.label.mode!r}; the DPO loss compares mse)"
        )
    if not float(config.diffusion.huber_c) > 0:
        raise ConfigError(f"config.diffusion.huber_c must be > 0, got {config.diffusion.huber_c}")
    sampling = str(config.diffusion.timestep_sampling)
    if sampling not in schedules.TIMESTEP_SAMPLINGS:
        raise ConfigError(
            f"config.diffusion.timestep_sampling={sampling!r}: expected one of "
            f"{schedules.TIMESTEP_SAMPLINGS}"
        )
    if sampling != "uniform" and config.label.mode != "sft":
        raise ConfigError(
            f"config.diffusion.timestep_sampling={sampling!r}: only with config.label.mode="
            f"'sft' (got {config.label.mode!r}; Diffusion-DPO draws timesteps uniformly)"
        )
    if not float(config.diffusion.timestep_log_sigma_std) > 0:
        raise ConfigError(
            "config.diffusion.timestep_log_sigma_std must be > 0, got "
            f"{config.diffusion.timestep_log_sigma_std}"
        )
    if not 0.0 <= float(config.diffusion.timestep_uniform_share) <= 1.0:
        raise ConfigError(
            "config.diffusion.timestep_uniform_share must lie in [0, 1], got "
            f"{config.diffusion.timestep_uniform_share}"
        )
    for name in ("steps", "global_batch_size", "log_every", "checkpoint_every"):
        if int(config.train[name]) < 1:
            raise ConfigError(f"config.train.{name} must be >= 1, got {config.train[name]}")
    accum = int(config.optim.grad_accum_steps)
    if accum < 1:
        raise ConfigError(f"config.optim.grad_accum_steps must be >= 1, got {accum}")
    if int(config.train.global_batch_size) % accum:
        raise ConfigError(
            f"config.train.global_batch_size={config.train.global_batch_size} must be divisible "
            f"by config.optim.grad_accum_steps={accum} (the pairs of one micro-batch)"
        )
    if config.dpo.ref_update not in train_step.REF_UPDATES:
        raise ConfigError(
            f"config.dpo.ref_update={config.dpo.ref_update!r}: expected one of "
            f"{train_step.REF_UPDATES}"
        )
    if lora.spec_from_config(config.lora) is not None and config.dpo.ref_update == "ema":
        raise ConfigError(
            "config.dpo.ref_update='ema' with config.lora.rank > 0: an EMA of the factors A, B "
            "is not an EMA of the update A @ B; use 'copy'"
        )


def make_train_step(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, model: nn.Module
) -> tuple[StepFn, optax.GradientTransformation, dict[str, np.ndarray]]:
    """The (unjitted) train step of `config`, its optimizer and its runtime inputs (host arrays).

    Builds each part of the step once from the config: the optimizer and lr schedule, the label
    function, the noise schedule and the loss function (DPO, or SFT for label mode 'sft').
    Runtime inputs (see `train_step.make_consts`) include beta and the label weights: runs that
    differ only in them (e.g. label mode 'single' on another scorer) share one program.
    """
    label = config.label
    tx, lr_schedule = optim.make_optimizer(
        config.optim, int(config.train.global_batch_size), int(config.train.steps)
    )
    label_fn = labels.make_label_fn(
        label.mode,
        info.scorer_names,
        scorer=label.scorer,
        smpo_lo=float(label.smpo_lo),
        smpo_hi=float(label.smpo_hi),
        smpo_scale=float(label.smpo_scale),
    )
    schedule = schedules.make_schedule(
        num_train_timesteps=int(config.diffusion.num_train_timesteps),
        beta_schedule=config.diffusion.beta_schedule,
        beta_start=float(config.diffusion.beta_start),
        beta_end=float(config.diffusion.beta_end),
    )
    loss_fn = train_step.make_loss_fn(
        "sft" if label.mode == "sft" else "dpo",
        model,
        schedule,
        prediction_type=config.model.prediction_type,
        vae_scaling_factor=float(info.vae_scaling_factor),
        proportion_empty_prompts=float(config.dpo.proportion_empty_prompts),
        matched_forward=bool(config.dpo.matched_forward),
        snr_gamma=float(config.diffusion.snr_gamma),
        snr_weighting=str(config.diffusion.snr_weighting),
        loss_type=str(config.diffusion.loss_type),
        huber_c=float(config.diffusion.huber_c),
        timestep_probabilities_T=(
            None
            if config.diffusion.timestep_sampling == "uniform"
            else schedules.timestep_probabilities(
                schedule,
                str(config.diffusion.timestep_sampling),
                log_sigma_mean=float(config.diffusion.timestep_log_sigma_mean),
                log_sigma_std=float(config.diffusion.timestep_log_sigma_std),
                uniform_share=float(config.diffusion.timestep_uniform_share),
            )
        ),
    )
    step_fn = functools.partial(
        train_step.train_step,
        loss_fn=loss_fn,
        label_fn=label_fn,
        tx=tx,
        lr_schedule=lr_schedule,
        grad_accum_steps=int(config.optim.grad_accum_steps),
        lora=lora.spec_from_config(config.lora),
        ref_is_base=int(config.dpo.ref_update_every) == 0,
    )
    consts = train_step.make_consts(
        beta=float(config.dpo.beta),
        weights_K=labels.label_weights(label.mode, info.scorer_names, label.scorer, label.weights),
        score_std_K=info.score_std,
        empty_text_embeds=info.empty_text_embeds,
        empty_pooled_text_embeds=info.empty_pooled_text_embeds if info.pooled_dim else None,
    )
    return step_fn, tx, consts


def make_refresh(dpo_config: ml_collections.ConfigDict) -> Callable[[TrainState], TrainState]:
    """The reference refresh of config.dpo.ref_update: a copy, or an EMA step."""
    if dpo_config.ref_update == "ema":
        return functools.partial(train_step.ema_reference, decay=float(dpo_config.ref_ema_decay))
    return train_step.refresh_reference


def jit_train_step(
    step_fn: StepFn, shardings: TrainState, mesh: Mesh, base_shardings: Any = None
) -> jax.stages.Wrapped:
    """`step_fn` jitted with explicit shardings: the state as `shardings` (donated), the batch
    over the batch axes, the consts and the metrics replicated; a LoRA run's frozen base (the
    fourth argument) as `base_shardings`, not donated."""
    replicated = sharding.replicated(mesh)
    in_shardings = (shardings, sharding.batch_sharding(mesh), replicated)
    if base_shardings is not None:
        in_shardings += (base_shardings,)
    return compile_options.jit(
        sharding.traced_under_mesh(step_fn, mesh),
        in_shardings=in_shardings,
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )


def jit_refresh(dpo_config: ml_collections.ConfigDict, shardings: TrainState) -> jax.stages.Wrapped:
    """`make_refresh(dpo_config)` jitted: the state as `shardings`, donated."""
    return jax.jit(
        make_refresh(dpo_config),
        in_shardings=(shardings,),
        out_shardings=shardings,
        donate_argnums=(0,),
    )


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _initial_state(
    config: ml_collections.ConfigDict,
    host_params: train_state.Params | None,
    inits: train_state.Initializers,
) -> TrainState:
    """A fresh state: random init, loaded diffusers weights, or init_checkpoint's params (a LoRA
    run's fresh adapters depend on the seed only)."""
    key = jax.random.PRNGKey(int(config.seed))
    if inits.base is not None:
        return inits.init_random(key)
    if config.model.init_checkpoint:
        params = checkpointing.restore_params(
            config.model.init_checkpoint, inits.abstract.params, inits.shardings.params
        )
        return inits.init_from_params(params, key)
    if host_params is not None:
        return inits.init_from_params(train_state.place_params(host_params, inits), key)
    return inits.init_random(key)


def _frozen_base(
    config: ml_collections.ConfigDict,
    host_params: train_state.Params | None,
    base: train_state.FrozenBase,
) -> train_state.Params:
    """A LoRA run's frozen base, built the same way on a fresh start and on resume: the params
    of config.model.init_checkpoint, the loaded diffusers weights, or the seed's random init;
    cast to the base dtype and sharded, once."""
    if config.model.init_checkpoint:
        return checkpointing.restore_params(
            config.model.init_checkpoint, base.abstract, base.shardings
        )
    if host_params is not None:
        return train_state.place_params(host_params, base)
    return base.init_random(jax.random.PRNGKey(int(config.seed)))


def _log_summary(
    writer: metrics_writer.MetricsWriter, step: int, scalars: Mapping[str, float], what: str
) -> None:
    logging.info("%s: %s", what, ", ".join(f"{k} {v:,.6g}" for k, v in scalars.items()))
    writer.write_summary(step, scalars)


# config fields a resumed run may change: how long it runs, how it logs, saves and reads
RESUMABLE_FIELDS = frozenset(
    {
        "train.steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.async_checkpoints",
        "train.sample_every",
        "train.progress_bar",
        "data.num_workers",
        "data.prefetch",
        "data.read_threads",
    }
)


def changed_fields(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields present in both config dicts whose values differ (a field
    only one of them has, e.g. one added by a newer version, is not a change)."""
    changed = []
    for key in sorted(saved.keys() & new.keys()):
        name = f"{prefix}{key}"
        if isinstance(saved[key], dict) and isinstance(new[key], dict):
            changed += changed_fields(saved[key], new[key], name + ".")
        elif saved[key] != new[key]:
            changed.append(name)
    return changed


def check_resume_config(saved: dict[str, Any] | None, new: dict[str, Any], workdir: str) -> None:
    """A workdir's checkpoint resumes only under the config it was saved with (but for
    `RESUMABLE_FIELDS`): otherwise the run would go on with the old params under a config
    that claims another recipe."""
    if saved is None:
        return
    changed = [name for name in changed_fields(saved, new) if name not in RESUMABLE_FIELDS]
    if changed:
        shown = ", ".join(changed[:6]) + (
            f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        )
        raise ConfigError(
            f"{workdir} holds a checkpoint of a run with other settings ({shown}); resume it "
            "with its own config, or train in another workdir"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (or resume) the run of `config` in `workdir`; returns the final state."""
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh.shape)  # axes: sharding.BATCH_AXES
    global_batch = int(config.train.global_batch_size)
    sharding.check_batch_divisible(global_batch, mesh, int(config.optim.grad_accum_steps))
    rules = sharding.validate_rules(config.mesh.rules)

    info = data.dataset_info(config.data)
    labels.check_label_config(config.label, info.scorer_names)
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
    step_fn, tx, host_consts = make_train_step(config, info, model)
    lora_spec = lora.spec_from_config(config.lora)
    inits = train_state.make_initializers(
        model,
        tx,
        mesh,
        rules,
        int(config.mesh.fsdp_min_size),
        lora_spec=lora_spec,
        base_dtype=dtype_from_name(config.model.compute_dtype, "config.model.compute_dtype"),
    )
    base_shardings = None
    if inits.base is not None:  # merged kernels laid out as the base's
        base_shardings = inits.base.shardings
        step_fn = functools.partial(step_fn, base_shardings=base_shardings)
    jit_step = jit_train_step(step_fn, inits.shardings, mesh, base_shardings)
    refresh = jit_refresh(config.dpo, inits.shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    consts = jax.device_put(host_consts, sharding.replicated(mesh))
    write_grid = (
        grids.training_grid_writer(config, model, info) if config.train.sample_every else None
    )
    config_dict = json.loads(config.to_json_best_effort())
    manager = checkpointing.make_manager(
        workdir, int(config.train.keep_checkpoints), bool(config.train.async_checkpoints)
    )
    check_resume_config(checkpointing.saved_config(manager), config_dict, workdir)
    _write_json(os.path.join(workdir, checkpointing.UNET_CONFIG_FILE), unet_cfg)
    _write_json(os.path.join(workdir, checkpointing.CONFIG_FILE), config_dict)
    restored = checkpointing.restore_latest(manager, inits.abstract, inits.shardings, global_batch)
    if restored is None:
        state, position = _initial_state(config, host_params, inits), 0
    else:
        state, position = restored
        logging.info("resumed from %s at step %d", manager.directory, int(state.step))
    base_args: tuple[train_state.Params, ...] = ()  # the step's extra input: LoRA's frozen base
    merge = None  # LoRA: (base, adapters) -> the UNet params (for the sample grids)
    if inits.base is not None:
        base_args = (_frozen_base(config, host_params, inits.base),)
        merge = jax.jit(functools.partial(lora.merge, scale=lora_spec.scale))
    del host_params
    # this host's rows of every global batch, from the global data position on: the batches
    # are the same for any number of processes (see bdpo_jax.data.pipeline)
    dataset, _ = data.make_dataset(
        config.data,
        global_batch_size=global_batch,
        seed=int(config.seed),
        label_mode=config.label.mode,
        rows=sharding.process_batch_rows(batch_sharding, global_batch),
        start=position,
    )
    data_iter = iter(dataset)

    total = int(config.train.steps)
    start = int(state.step)
    writer = metrics_writer.MetricsWriter(
        workdir,
        total_steps=total,
        start_step=start,
        pairs_per_step=global_batch,
        progress=bool(config.train.progress_bar),
    )
    counts = train_state.param_counts(inits.abstract.params)
    if inits.base is not None:  # trained: the adapters; frozen: the base
        counts = {"total": counts["total"], "frozen": lora.count(inits.base.abstract)}
    _log_summary(writer, start, {f"params/{k}": v for k, v in counts.items()}, "parameters")
    host_memory.keep_freed_memory(4 * (counts["total"] + counts.get("frozen", 0)))
    log_every, ckpt_every = int(config.train.log_every), int(config.train.checkpoint_every)
    ref_every, sample_every = int(config.dpo.ref_update_every), int(config.train.sample_every)

    copy_refresh = bool(ref_every) and config.dpo.ref_update == "copy"
    health: dict[str, float] = {}  # held until the next written metrics row

    def report(step: int, metrics: train_step.Metrics) -> None:
        """Host copy of one step's metrics: stop at a non-finite loss, write at log steps.

        A step computed at policy == reference (step 1, and the step after each 'copy'
        refresh) adds its abs_inside_median to the next written row as
        ref_refresh_abs_inside_median: 0 in exact arithmetic, so it is the rounding noise of
        the DPO signal (see config.dpo.matched_forward)."""
        host = jax.device_get(metrics)
        metrics_writer.check_finite(step, float(host["loss"]))
        at_reference = step == 1 or (copy_refresh and (step - 1) % ref_every == 0)
        if at_reference and "abs_inside_median" in host:
            noise = float(host["abs_inside_median"])
            health["ref_refresh_abs_inside_median"] = noise
            if noise > _ABS_INSIDE_WARN:
                logging.warning(
                    "step %d: median |inside| %.3g at policy == reference (> %g): the DPO "
                    "signal is rounding noise x beta/2 (config.dpo.matched_forward=True fixes it)",
                    step,
                    noise,
                    _ABS_INSIDE_WARN,
                )
        if step % log_every == 0 or step == total:
            writer.write(step, {**host, **health})
            health.clear()

    compiled = None
    pending: tuple[int, train_step.Metrics] | None = None  # the last step's, still on device
    try:
        for step in range(start + 1, total + 1):  # `step` = optimiser steps done after this one
            host_batch = next(data_iter)
            position += global_batch
            batch = sharding.to_global_batch(
                {k: host_batch[k] for k in schema.BATCH_FIELDS if k in host_batch},
                batch_sharding,
                global_batch,
            )
            if compiled is None:
                t0 = time.perf_counter()
                compiled = jit_step.lower(state, batch, consts, *base_args).compile()
                _log_summary(writer, start, {"compile_seconds": time.perf_counter() - t0}, "step")
            state, metrics = compiled(state, batch, consts, *base_args)
            if ref_every and step % ref_every == 0:
                state = refresh(state)
            if pending is not None:  # the previous step's metrics, while the device runs this one
                report(*pending)
            pending = (step, metrics)
            writer.advance(step)
            if step % ckpt_every == 0 or step == total:
                report(*pending)  # never save past a non-finite loss
                pending = None
                checkpointing.save(manager, step, state, position, config_dict)
            if sample_every and step % sample_every == 0:
                params = state.params if merge is None else merge(*base_args, state.params)
                write_grid(params, host_batch, workdir, step)
        if pending is not None:
            report(*pending)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        close_iterator = getattr(data_iter, "close", None)
        if close_iterator is not None:  # stops Grain's worker processes, if any
            close_iterator()
    metrics_writer.plot_curves(workdir)
    return state


# --- command line ---------------------------------------------------------------------------

_PROG = "bdpo_jax.train"
_CONFIG_OVERRIDE = "--config."


def _unknown_field_message(argv: Sequence[str], error: Exception) -> str | None:
    """One line naming the `--config.a.b` override whose field does not exist (ml_collections
    raises a KeyError or AttributeError "'b'\\nDid you mean ...?"), or None if none is found."""
    text = str(error)
    key = re.search(r"[A-Za-z_]\w*", text)
    if key is None:
        return None
    hint = re.search(r'Did you mean "(\w+)"', text)
    for arg in argv[1:]:
        if not arg.startswith(_CONFIG_OVERRIDE):
            continue
        path = arg[len(_CONFIG_OVERRIDE) :].split("=", 1)[0]
        if key.group(0) in path.split("."):
            suggestion = f' (did you mean "{hint.group(1)}"?)' if hint else ""
            return f"{arg}: config.{path} is not a config field{suggestion}"
    return None


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with its errors as ConfigError (one line, exit code 2)."""
    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except flags.Error as error:  # unknown flag, bad value, missing --workdir
        raise ConfigError(str(error)) from error
    except (AttributeError, KeyError) as error:  # an unknown --config.a.b field
        message = _unknown_field_message(argv, error)
        if message is None:
            raise
        raise ConfigError(message) from error


def _config_value(config_flag: Any) -> ml_collections.ConfigDict:
    """The --config file's config; a file that failed to load raises on first use: ConfigError."""
    try:
        return config_flag.value.lock()  # lock() returns the (already locked) config
    except OSError as error:
        reason = str(error).strip().splitlines()[-1].strip()
        raise ConfigError(f"--config: cannot load the config file: {reason}") from error


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    from absl import app, flags
    from ml_collections import config_flags

    argv, debug = schema.pop_debug_flag(sys.argv if argv is None else argv)
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "a configs/*.py file", lock_config=True
    )
    workdir_flag = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, config")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(_: Any) -> None:
        # jax logs (at INFO, which absl turns on) each accelerator platform it probes and does
        # not find; on a CPU or GPU machine that is noise before a user error's one line
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
        sharding.maybe_initialize_distributed()
        train_and_evaluate(_config_value(config_flag), workdir_flag.value)

    schema.run_cli(_PROG, lambda: app.run(run, argv=argv, flags_parser=_parse_flags), debug)


if __name__ == "__main__":
    main()
