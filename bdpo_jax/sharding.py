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

Multi-host: `maybe_initialize_distributed()` calls `jax.distributed.initialize()` (which reads
SLURM / Open MPI / TPU-pod / coordinator environment variables) when several processes are
launched; each host then feeds its own slice of the global batch (see to_global_batch).
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

BATCH_AXES = ("data", "fsdp")
_DISTRIBUTED_ENV = (  # any of these set means a multi-process launch
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when launched as several processes; True if so.

    Detected: JAX_COORDINATOR_ADDRESS (set with JAX_NUM_PROCESSES / JAX_PROCESS_ID), SLURM with
    more than one task, Open MPI with more than one rank, a multi-host TPU slice
    (TPU_WORKER_HOSTNAMES with several hosts). BDPO_DISTRIBUTED=0 disables, =1 forces.
    """
    forced = os.environ.get("BDPO_DISTRIBUTED")
    if forced == "0":
        return False
    multi = forced == "1" or any(os.environ.get(k) for k in _DISTRIBUTED_ENV)
    multi |= int(os.environ.get("SLURM_NTASKS", "1")) > 1
    multi |= int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    multi |= len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    if not multi:
        return False
    jax.distributed.initialize()
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


def to_global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
    """Global jax.Arrays from this process's batch; the leading axis sharded by `sharding`.

    With P processes the global batch is P times the local one, ordered by process.
    """
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in batch.items()
    }


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
