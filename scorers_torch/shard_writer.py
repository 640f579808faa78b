"""Atomic ArrayRecord shards: write to a temp name, then os.replace to the final name.

Each shard `NAME` has a JSON sidecar `NAME.json` (its counts and per-pair statistics, so a
resumed run rebuilds the manifest without reading shards back). The sidecar is renamed into
place before the shard, so a shard under its final name always has its sidecar: a kill at any
point leaves either a finished shard or only temp files, which the next run removes.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from bdpo_jax import schema

WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random access
TEMP_PREFIX = ".tmp-"


def sidecar_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, name + ".json")


def shard_is_done(out_dir: str, name: str) -> bool:
    """True when the shard and its sidecar both exist under their final names."""
    return os.path.isfile(os.path.join(out_dir, name)) and os.path.isfile(
        sidecar_path(out_dir, name)
    )


def read_sidecar(out_dir: str, name: str) -> dict[str, Any]:
    path = sidecar_path(out_dir, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise OSError(f"{path}: unreadable shard sidecar ({err}); delete it and its shard") from err


def remove_stale_temps(out_dir: str, worker_index: int) -> list[str]:
    """Deletes temp files a killed run of this worker left behind; returns their paths."""
    prefix = os.path.join(glob.escape(out_dir), TEMP_PREFIX + schema.shard_name(worker_index, 0))
    pattern = prefix.rsplit("-", 1)[0] + "-*"  # every shard of this worker
    stale = sorted(glob.glob(pattern))
    for path in stale:
        os.remove(path)
    return stale


class ShardWriter:
    """Streams encoded records into a temp file; `commit(sidecar)` publishes shard + sidecar."""

    def __init__(self, out_dir: str, name: str):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.out_dir, self.name = out_dir, name
        self.final_path = os.path.join(out_dir, name)
        self.temp_path = os.path.join(out_dir, f"{TEMP_PREFIX}{name}.{os.getpid()}")
        self._writer = ArrayRecordWriter(self.temp_path, WRITER_OPTIONS)
        self.num_records = 0

    def write(self, record: dict[str, Any]) -> None:
        self._writer.write(schema.encode_record(record))
        self.num_records += 1

    def commit(self, sidecar: dict[str, Any]) -> None:
        self._writer.close()
        final_sidecar = sidecar_path(self.out_dir, self.name)
        temp_sidecar = os.path.join(self.out_dir, f"{TEMP_PREFIX}{self.name}.json.{os.getpid()}")
        with open(temp_sidecar, "w") as f:
            json.dump({**sidecar, "num_records": self.num_records}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_sidecar, final_sidecar)
        os.replace(self.temp_path, self.final_path)

    def abort(self) -> None:
        """Closes and deletes the temp file (on an error before commit)."""
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.temp_path):
                os.remove(self.temp_path)
