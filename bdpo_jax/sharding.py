"""Mesh, parameter sharding rules and batch placement (the one module that owns sharding).

Sharding is declared as data (big_vision's regex -> tactic table, nanodo's shapes-first init):

    config.mesh.shape = (data, fsdp)            # -1 takes the remaining devices
    config.mesh.rules = (("regex", "tactic"),)  # first match wins; no match -> "fsdp"

A tactic is "replicate", "fsdp" (shard the largest axis divisible by the fsdp size, for leaves
with at least config.mesh.fsdp_min_size elements) or an explicit PartitionSpec written as
comma-separated axis names ("None,None,None,fsdp"). Rules match `re.search` on the leaf's path
("down_blocks_0/attentions_0/proj_in/kernel"); optimizer-state leaves carry the parameter path
inside theirs ("1/0/mu/down_blocks_0/..."), so the same rules shard Adam's moments like the
parameters. The batch is sharded over ("data", "fsdp") on axis 0.

Several processes (hosts): `maybe_initialize_distributed()` calls `jax.distributed.initialize`
for the launch it finds in the environment (`distributed_launch`); each process then loads
only the rows of the global batch its devices hold (`process_batch_rows`) and
`to_global_batch` places them there, so a step's global batch does not depend on the number
of processes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bdpo_jax.schema import ConfigError

BATCH_AXES = ("data", "fsdp")
DISTRIBUTED_FLAG = "BDPO_DISTRIBUTED"  # "0": never initialise, "1": always (auto-detect)
_ADDRESS, _COUNT, _ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
_LAUNCH_VARS = f"{_ADDRESS}, {_COUNT} and {_ID}"


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError(f"{name}={environ[name]!r} must be an integer") from None


def distributed_launch(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """How this process was launched, from environment variables `environ`.

    Returns None for a single process, else the keyword arguments for
    `jax.distributed.initialize`: {coordinator_address, num_processes, process_id} from
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (all three, or none), or {}
    for jax's own cluster detection: SLURM (srun with several tasks), Open MPI 4 (mpirun with
    several ranks), a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts).
    BDPO_DISTRIBUTED=0 gives None, =1 forces a launch. A half-configured launch raises
    ConfigError, one line naming the variables.
    """
    forced = environ.get(DISTRIBUTED_FLAG, "")
    if forced not in ("", "0", "1"):
        raise ConfigError(f"{DISTRIBUTED_FLAG}={forced!r} must be 0 or 1")
    if forced == "0":
        return None
    given = [name for name in (_ADDRESS, _COUNT, _ID) if environ.get(name, "") != ""]
    if given:
        missing = [name for name in (_ADDRESS, _COUNT, _ID) if name not in given]
        if missing:
            raise ConfigError(
                f"{', '.join(given)} set without {', '.join(missing)}: a multi-process launch "
                f"sets {_LAUNCH_VARS} in every process (or none of them)"
            )
        count, index = _env_int(environ, _COUNT), _env_int(environ, _ID)
        if count < 1:
            raise ConfigError(f"{_COUNT}={count} must be >= 1")
        if not 0 <= index < count:
            raise ConfigError(f"{_ID}={index} must be in [0, {_COUNT}={count})")
        if count == 1 and forced != "1":
            return None
        return {
            "coordinator_address": environ[_ADDRESS],
            "num_processes": count,
            "process_id": index,
        }
    several = forced == "1"
    # srun sets SLURM_STEP_*; a batch script's own python (no srun) is one process
    slurm_tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1"
    several |= "SLURM_STEP_NODELIST" in environ and int(slurm_tasks) > 1
    several |= int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    several |= len(environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    return {} if several else None


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Call `jax.distributed.initialize` when launched as several processes; True if so.

    See `distributed_launch` for the launches it recognises. On CPU the cross-process
    collectives are gloo's. Call it before anything else touches jax's devices.
    """
    launch = distributed_launch(os.environ if environ is None else environ)
    if launch is None:
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**launch)
    except ValueError as error:  # jax's cluster detection found no coordinator / count / id
        raise ConfigError(
            f"several processes detected but jax.distributed.initialize() failed: {error}; "
            f"set {_LAUNCH_VARS} (or {DISTRIBUTED_FLAG}=0 for a single process)"
        ) from error
    logging.info(
        "jax.distributed initialised: process %d of %d, %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )
    return True


def make_mesh(
    shape: Sequence[int],
    axis_names: Sequence[str] = BATCH_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A Mesh of `shape` over `devices` (default all); one -1 entry takes the remaining ones."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(axis_names):
        raise ValueError(
            f"config.mesh.shape {tuple(shape)} must have one entry per axis name "
            f"{tuple(axis_names)}"
        )
    if tuple(axis_names) != BATCH_AXES:
        raise ValueError(f"config.mesh.axis_names must be {BATCH_AXES}, got {tuple(axis_names)}")
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh.shape {tuple(shape)}: at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(
                f"config.mesh.shape {tuple(shape)} does not divide the {len(devices)} devices"
            )
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"config.mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
            f"there are {len(devices)}"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), tuple(axis_names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def traced_under_mesh(fn: Any, mesh: Mesh) -> Any:
    """`fn` traced with `mesh` as the abstract mesh, so that code inside it (the model) can
    place a value without being handed the mesh (models.attention.split_over_mesh)."""

    def wrapped(*args: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return wrapped


def process_batch_rows(sharding: NamedSharding, global_batch_size: int) -> np.ndarray:
    """Rows of the global batch that this process's devices hold (ascending).

    These are the rows this host loads: `jax.make_array_from_process_local_data` fills the
    process's slices of the global array from its local rows in ascending global order.
    With the mesh over `jax.devices()` (ordered by process) each host holds one contiguous
    slice: host p of P the rows [p * B / P, (p + 1) * B / P).
    """
    index_map = sharding.addressable_devices_indices_map((int(global_batch_size),))
    rows = set()
    for index in index_map.values():
        rows.update(range(*index[0].indices(int(global_batch_size))))
    return np.array(sorted(rows), np.int64)


def to_global_batch(
    batch: Mapping[str, np.ndarray], sharding: NamedSharding, global_batch_size: int | None = None
) -> dict[str, Any]:
    """Global jax.Arrays from this process's batch; the leading axis sharded by `sharding`.

    The local batch holds this process's rows (`process_batch_rows`) in ascending order; with
    `global_batch_size` None it is inferred (the local rows times the number of processes).
    """
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        shape = None if global_batch_size is None else (int(global_batch_size), *value.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


def check_batch_divisible(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    """Clear error when the batch cannot be split over the devices (and micro-batches)."""
    n = mesh.devices.size
    if global_batch_size % (n * grad_accum_steps):
        raise ValueError(
            f"config.train.global_batch_size={global_batch_size} must be divisible by the number "
            f"of devices ({n}) x config.optim.grad_accum_steps ({grad_accum_steps})"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"config.train.global_batch_size={global_batch_size} must be divisible by the number "
            f"of processes ({jax.process_count()})"
        )


def path_to_str(path: tuple[Any, ...]) -> str:
    """'down_blocks_0/resnets_0/conv1/kernel' from a jax tree key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    """Shard the largest axis divisible by the fsdp size; replicate small or odd leaves."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def _parse_tactic(tactic: str, ndim: int) -> PartitionSpec | str:
    if tactic in ("replicate", "fsdp"):
        return tactic
    axes = [None if a.strip() in ("None", "") else a.strip() for a in tactic.split(",")]
    if len(axes) != ndim:
        return "fsdp"  # e.g. Adafactor's factored moments: rank differs, use the default rule
    return PartitionSpec(*axes)


def spec_for(
    path: str, shape: tuple[int, ...], rules: Sequence[tuple[str, str]], mesh: Any, min_size: int
) -> PartitionSpec:
    """The PartitionSpec of one leaf: first matching rule, else the FSDP default.

    `mesh` only needs `.shape` (axis name -> size), so memory plans work without devices.
    """
    fsdp_size = mesh.shape["fsdp"]
    tactic: PartitionSpec | str = "fsdp"
    for pattern, rule in rules:
        if re.search(pattern, path):
            tactic = _parse_tactic(rule, len(shape))
            break
    if tactic == "replicate" or not shape:
        return PartitionSpec()
    if tactic == "fsdp":
        return _fsdp_spec(shape, fsdp_size, min_size)
    for axis, name in enumerate(tactic):
        size = mesh.shape[name] if isinstance(name, str) else 1
        if name is not None and shape[axis] % size:
            raise ValueError(
                f"config.mesh.rules: spec {tactic} for {path!r} does not divide shape {shape}"
            )
    return tactic


def tree_shardings(
    abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = (), min_size: int = 2**18
) -> Any:
    """NamedShardings for every leaf of an (abstract) pytree, by path rules and shape."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(path_to_str(path), shape, rules, mesh, min_size))

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def validate_rules(rules: Sequence[Sequence[str]]) -> tuple[tuple[str, str], ...]:
    """Check config.mesh.rules is a sequence of (regex, tactic) string pairs."""
    out = []
    for rule in rules:
        if len(rule) != 2 or not all(isinstance(x, str) for x in rule):
            raise ValueError(
                f"config.mesh.rules entries must be (regex, tactic) pairs, got {rule!r}"
            )
        try:
            re.compile(rule[0])
        except re.error as error:
            raise ValueError(f"config.mesh.rules: bad regex {rule[0]!r}: {error}") from error
        out.append((rule[0], rule[1]))
    return tuple(out)
