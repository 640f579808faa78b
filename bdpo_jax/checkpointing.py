"""Orbax checkpoints of a run: the state, the data position and the config, together.

Layout (this module owns it; bdpo_jax.export and the demo read checkpoints through it):

    WORKDIR/checkpoints/<step>/state      {"step", "params", "ref_params", "opt_state", "rng"}
    WORKDIR/checkpoints/<step>/data_iter  the data position {"position": next global record
                                          position}: one JSON that any process count reads
    WORKDIR/checkpoints/<step>/config     the run's config as JSON
    WORKDIR/config.json                   the run's config (written by bdpo_jax.train)
    WORKDIR/unet_config.json              the diffusers UNet config

Saves are asynchronous (the device-to-host copy blocks, the write does not); the manager keeps
the last config.train.keep_checkpoints. A run restores the latest step of its workdir by itself.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from bdpo_jax import schema
from bdpo_jax.train_state import TrainState

CHECKPOINT_DIR = "checkpoints"  # WORKDIR/checkpoints/<step>/...
CONFIG_FILE = "config.json"  # WORKDIR/config.json: the run's config
UNET_CONFIG_FILE = "unet_config.json"  # WORKDIR/unet_config.json: the diffusers UNet config
STATE_ITEM = "state"  # WORKDIR/checkpoints/<step>/state: the TrainState
DATA_ITEM = "data_iter"  # WORKDIR/checkpoints/<step>/data_iter: {"position": int}
ITEMS = (STATE_ITEM, DATA_ITEM, "config")
INIT_CHECKPOINT = "config.model.init_checkpoint"  # the default `source` named in errors


class CheckpointError(schema.UserError, FileNotFoundError):
    """No checkpoint where a flag or config field points (the message names it)."""


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The run's CheckpointManager at WORKDIR/checkpoints (saves when told, keeps `keep`)."""
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(keep), 1), create=True, enable_async_checkpointing=async_save
    )
    handlers = {
        STATE_ITEM: ocp.StandardCheckpointHandler(),
        DATA_ITEM: ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: TrainState,
    data_position: int,
    config_dict: dict[str, Any],
) -> None:
    """Start saving `state`, the data position (the next global record position, see
    `bdpo_jax.data.pipeline`) and the config at `step`."""
    manager.save(
        int(step),
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state.to_dict()),
                DATA_ITEM: ocp.args.JsonSave({"position": int(data_position)}),
                "config": ocp.args.JsonSave(config_dict),
            }
        ),
        force=True,
    )


def saved_config(manager: ocp.CheckpointManager) -> dict[str, Any] | None:
    """The config saved with the latest checkpoint (`save`'s config_dict), or None when the
    workdir has no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored["config"])


def _abstract(shardings_tree: Any, abstract_tree: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_tree,
        shardings_tree,
    )


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: TrainState,
    shardings: TrainState,
    global_batch_size: int,
) -> tuple[TrainState, int] | None:
    """(the latest saved state, sharded as `shardings`; its data position), or None when the
    workdir has no checkpoint. A checkpoint without a readable position (one written before
    positions were saved) resumes at `step * global_batch_size`."""
    step = manager.latest_step()
    if step is None:
        return None
    target = _abstract(shardings, abstract_state).to_dict()
    restored = manager.restore(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
    )
    state = TrainState.from_dict(restored[STATE_ITEM])
    position = int(state.step) * int(global_batch_size)
    try:
        data_item = manager.restore(
            step, args=ocp.args.Composite(**{DATA_ITEM: ocp.args.JsonRestore()})
        )[DATA_ITEM]
        position = int(data_item["position"])
    except Exception as error:  # noqa: BLE001 (any unreadable item: fall back, say so)
        logging.warning(
            "checkpoint %d: no readable data position (%s); resuming the data at step x "
            "global batch = %d",
            step,
            str(error).splitlines()[0] if str(error) else type(error).__name__,
            position,
        )
    return state, position


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Steps with a folder under `directory` (a WORKDIR/checkpoints folder), ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name))
    )


def find_checkpoint(
    path: str | os.PathLike, step: int | None = None, *, source: str = INIT_CHECKPOINT
) -> tuple[int | None, str]:
    """(step, step folder) of a trainer checkpoint; the latest step unless `step`.

    `path` is a workdir, its checkpoints folder, or one step folder (step None when the folder
    is not named by its step). `source` names the flag or config field in the errors.
    """
    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, STATE_ITEM)):  # one step folder
        name = os.path.basename(os.path.normpath(path))
        found = int(name) if name.isdigit() else None
        if step is not None and step != found:
            raise CheckpointError(f"--step {step}: {source}={path!r} is the checkpoint {found}")
        return found, path
    directory = os.path.join(path, CHECKPOINT_DIR)
    if not os.path.isdir(directory) and checkpoint_steps(path):
        directory = path  # the checkpoints folder itself
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{source}={path!r}: no {CHECKPOINT_DIR}/ folder nor Orbax {STATE_ITEM!r} item "
            "(give a trainer workdir, its checkpoints folder or one step folder)"
        )
    steps = checkpoint_steps(directory)
    if not steps:
        raise CheckpointError(f"{source}={path!r}: {directory} holds no checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"--step {step}: no checkpoint at that step; available: {steps}")
    step_dir = os.path.join(directory, str(step))
    if not os.path.isdir(os.path.join(step_dir, STATE_ITEM)):
        raise CheckpointError(f"{step_dir}: checkpoint {step} has no {STATE_ITEM!r} item")
    return step, step_dir


def restore_params(
    path: str | os.PathLike,
    abstract_params: Any = None,
    param_shardings: Any = None,
    *,
    step: int | None = None,
    source: str = INIT_CHECKPOINT,
) -> Any:
    """The params of a trainer checkpoint (only "params": not the reference or the optimizer).

    `path` as for `find_checkpoint` (latest step unless `step`). With `param_shardings` (and
    `abstract_params`, e.g. config.model.init_checkpoint) the params come back as jax Arrays
    placed as those shardings; without, as a tree of numpy arrays on the host (export).
    """
    _, step_dir = find_checkpoint(path, step, source=source)
    state_dir = os.path.abspath(os.path.join(step_dir, STATE_ITEM))
    with ocp.PyTreeCheckpointer() as checkpointer:
        if param_shardings is not None:
            target = {"params": _abstract(param_shardings, abstract_params)}
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        else:
            metadata = checkpointer.metadata(state_dir)
            tree = getattr(metadata, "item_metadata", metadata)
            tree = getattr(tree, "tree", tree)
            if not isinstance(tree, dict) or "params" not in tree:
                raise CheckpointError(f"{state_dir}: the saved state has no 'params' entry")
            meta = tree["params"]
            target = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta)}
            restore_args = {
                "params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
            }
        restored = checkpointer.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True),
        )
    return restored["params"]
