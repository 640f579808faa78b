"""Orbax checkpoints of a run: the state, the Grain iterator and the config, together.

Layout (bdpo_jax.export reads it; keep it):

    WORKDIR/checkpoints/<step>/state      {"step", "params", "ref_params", "opt_state", "rng"}
    WORKDIR/checkpoints/<step>/data_iter  Grain iterator state (one JSON per process)
    WORKDIR/checkpoints/<step>/config     the run's config as JSON

Saves are asynchronous (the device-to-host copy blocks, the write does not); the manager keeps
the last config.train.keep_checkpoints. A run restores the latest step of its workdir by itself.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from bdpo_jax.train_state import TrainState

CHECKPOINT_DIR = "checkpoints"  # WORKDIR/checkpoints/<step>/...
CONFIG_FILE = "config.json"  # WORKDIR/config.json: the run's config
UNET_CONFIG_FILE = "unet_config.json"  # WORKDIR/unet_config.json: the diffusers UNet config
ITEMS = ("state", "data_iter", "config")


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The run's CheckpointManager at WORKDIR/checkpoints (saves when told, keeps `keep`)."""
    import grain.checkpoint as grain_checkpoint

    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(keep), 1), create=True, enable_async_checkpointing=async_save
    )
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "data_iter": grain_checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: TrainState,
    data_iter: Any,
    config_dict: dict[str, Any],
) -> None:
    """Start saving `state`, the iterator position and the config at `step`."""
    import grain.checkpoint as grain_checkpoint

    manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state.to_dict()),
            data_iter=grain_checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config_dict),
        ),
        force=True,
    )


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
    data_iter: Any,
) -> TrainState | None:
    """The latest saved state (sharded as `shardings`), the iterator restored in place; None
    when the workdir has no checkpoint."""
    import grain.checkpoint as grain_checkpoint

    step = manager.latest_step()
    if step is None:
        return None
    target = _abstract(shardings, abstract_state).to_dict()
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data_iter=grain_checkpoint.CheckpointRestore(data_iter),
        ),
    )
    return TrainState.from_dict(restored["state"])


def restore_params(path: str, abstract_params: Any, param_shardings: Any) -> Any:
    """config.model.init_checkpoint: params of a trainer checkpoint.

    `path` is a workdir (latest step), its checkpoints folder, or one step folder.
    """
    candidates = [os.path.join(path, CHECKPOINT_DIR), path]
    for directory in candidates:
        if os.path.isdir(directory) and not os.path.isdir(os.path.join(directory, "state")):
            steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
            if steps:
                path = os.path.join(directory, str(max(steps)))
                break
    state_dir = os.path.join(path, "state")
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(
            f"config.model.init_checkpoint={path!r}: no Orbax 'state' item found "
            "(give a trainer workdir, its checkpoints folder or one step folder)"
        )
    target = {"params": _abstract(param_shardings, abstract_params)}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            os.path.abspath(state_dir),
            args=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True),
        )
    return restored["params"]
