"""The Grain input pipeline over a random-access source of records (shards or synthetic).

Pipeline (one per process):

    MapDataset.source(all records, in manifest order)   global record index 0..N-1
      -> shuffle(seed)            a fresh permutation every epoch (grain reseeds per epoch)
      -> repeat()                 infinite stream of global positions 0, 1, 2, ...
      -> [process_index::process_count]   multi-host: host p reads positions p, p+P, ...
      -> decode + choose a view per image (when V == 2 and data.random_flip)
      -> filter tied labels (data.drop_tied_labels)
      -> batch(global_batch_size // process_count, drop_remainder=True)
      -> mp_prefetch(data.num_workers) or a prefetch thread

Every epoch is a permutation of all N records, so the hosts together read each record
exactly once per epoch and no two hosts read the same position. The iterator is a Grain
`DatasetIterator`: `get_state`/`set_state` resume exactly, and
`data_iterator_checkpoint_args` gives the Orbax args for a CompositeCheckpoint item.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from bdpo_jax import schema

# Numeric fields of a batch with their dtypes: the schema's batch fields, plus the global
# record index of every pair.
BATCH_DTYPES = {name: np.dtype(schema.ARRAY_FIELDS[name][0]) for name in schema.BATCH_FIELDS}
BATCH_DTYPES["index"] = np.dtype(np.int64)


class _IndexedSource(grain.sources.RandomAccessDataSource):
    """A data source whose elements are (global record index, element)."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        return int(index), self._source[index]

    def __repr__(self) -> str:
        return f"_IndexedSource({self._source!r})"


# --- per-record transforms ------------------------------------------------------------------


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a cheap, well-mixed hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def choose_views(seed: int, position: int, views: int) -> tuple[int, int]:
    """Views for image 0 and image 1 at stream `position`: independent fair coins."""
    if views == 1:
        return 0, 0
    bits = _mix64(_mix64(seed) ^ position)
    return bits & 1, (bits >> 1) & 1


def keep_record(record: Mapping[str, Any], label_mode: str) -> bool:
    """False for a pair whose label in `label_mode` is a tie (or missing)."""
    if label_mode == "majority":
        return int(record["label"]) != 0
    if label_mode == "human":
        human = float(record["human_label"])
        return human == human and human != 0.0  # drops NaN and 0
    return True


def _batch_element(record: Mapping[str, Any], index: int, v0: int, v1: int) -> dict:
    element = {
        "moments_0": record["moments_0"][v0],
        "moments_1": record["moments_1"][v1],
        "index": np.int64(index),
    }
    for name in BATCH_DTYPES:
        if name not in element and name in record:
            element[name] = record[name]
    return element


class _ToElement:
    """(local position, (record index, record)) -> numeric batch element."""

    def __init__(self, *, decode: bool, seed: int, flip: bool, process_index, process_count):
        self.decode, self.seed, self.flip = decode, seed, flip
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, local_position: int, item) -> dict:
        index, record = item
        if self.decode:
            record = schema.decode_record(record)
        views = record["moments_0"].shape[0] if self.flip else 1
        position = self.process_index + local_position * self.process_count
        v0, v1 = choose_views(self.seed, position, views)
        return _batch_element(record, index, v0, v1)


class _KeepFilter:
    """Tie filter that fails loudly instead of spinning when nothing passes."""

    def __init__(self, label_mode: str, limit: int):
        self.label_mode, self.limit, self.rejected = label_mode, limit, 0

    def __call__(self, element: Mapping[str, Any]) -> bool:
        if keep_record(element, self.label_mode):
            self.rejected = 0
            return True
        self.rejected += 1
        if self.rejected > self.limit:
            raise ValueError(
                f"{self.rejected} records in a row are ties for label mode "
                f"{self.label_mode!r}; the data has no usable pairs for this mode "
                "(set --config.data.drop_tied_labels=False to keep ties)"
            )
        return False


# --- iterator lifetime ----------------------------------------------------------------------

_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    """Stop prefetch threads and worker processes before interpreter teardown.

    Without this an iterator still referenced at exit aborts the exit from C++ or prints
    spurious errors: Grain's `__del__` runs again during teardown, when module globals
    are gone, so it is disabled once everything is closed.
    """
    for iterator in list(_LIVE_ITERATORS):
        iterator.close()
    grain.DatasetIterator.__del__ = lambda self: None


class _ClosedAtExit(grain.IterDataset):
    """Passes its parent's iterator through, registered to be closed at exit."""

    def __iter__(self):
        iterator = self._parent.__iter__()
        _LIVE_ITERATORS.add(iterator)
        return iterator


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside `app.run` mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_pipeline(
    source,
    *,
    data_config,
    num_records: int,
    global_batch_size: int,
    seed: int,
    label_mode: str,
    process_index: int,
    process_count: int,
    decode: bool,
) -> grain.IterDataset:
    """The shared pipeline over a random-access `source` of records (bytes when `decode`)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index/process_count {process_index}/{process_count}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    batch_size = global_batch_size // process_count
    if batch_size < 1:
        raise ValueError(f"global batch size must be positive, got {global_batch_size}")
    seed = int(seed) % 2**32
    ds = grain.MapDataset.source(_IndexedSource(source))
    if data_config.shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat()
    if process_count > 1:
        ds = ds[process_index::process_count]
    to_element = _ToElement(
        decode=decode,
        seed=seed,
        flip=bool(data_config.random_flip),
        process_index=process_index,
        process_count=process_count,
    )
    ds = ds.map_with_index(to_element)
    read_buffer = max(batch_size * max(int(data_config.prefetch), 1), 16)
    ids = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=int(data_config.get("read_threads", 0)), prefetch_buffer_size=read_buffer
        )
    )
    if data_config.drop_tied_labels:
        ids = ids.filter(_KeepFilter(label_mode, limit=max(num_records, 64)))
    ids = ids.batch(batch_size, drop_remainder=True)
    if int(data_config.num_workers) > 0:
        _ensure_absl_flags_parsed()
        options = grain.MultiprocessingOptions(
            num_workers=int(data_config.num_workers),
            per_worker_buffer_size=max(int(data_config.prefetch), 1),
        )
        ids = ids.mp_prefetch(options)
    elif int(data_config.prefetch) > 0:
        ids = grain.experimental.ThreadPrefetchIterDataset(
            ids, prefetch_buffer_size=int(data_config.prefetch)
        )
    return _ClosedAtExit(ids)


def data_iterator_checkpoint_args(iterator: grain.DatasetIterator, restore: bool):
    """Orbax args for the data iterator as one item of a CompositeCheckpoint.

    Save:    ocp.args.Composite(state=..., data=data_iterator_checkpoint_args(it, False))
    Restore: ocp.args.Composite(state=..., data=data_iterator_checkpoint_args(it, True));
             the iterator `it` (made by the same config) is restored in place.
    Each process writes its own `process_<i>-of-<n>.json` (Grain's CheckpointHandler).
    """
    import grain.checkpoint as grain_checkpoint  # imports orbax

    if restore:
        return grain_checkpoint.CheckpointRestore(iterator)
    return grain_checkpoint.CheckpointSave(iterator)
