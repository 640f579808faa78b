"""The Grain input pipeline over a random-access source of records (shards or synthetic).

The data order is global: it depends on the seed and the global batch size, never on the
number of processes (hosts) or of Grain workers.

    global order     MapDataset.range(N).shuffle(seed).repeat(): position g -> record index
                     (a fresh permutation every epoch: grain reseeds the shuffle per epoch)
    global batch t   positions start + t * B + r for the rows r = 0..B-1
    this host        loads only the rows it owns (`rows`, ascending: what its devices hold of
                     the batch, `sharding.process_batch_rows`; a contiguous slice per host)
    position g       record order[g], decoded; its view per image (data.random_flip, V == 2) is
                     a coin of (seed, g); a tie (data.drop_tied_labels) is replaced by a random
                     non-tied record drawn from (seed, g), so every row stays a function of g

    MapDataset.range(batches).map(_ReadBatch) -> to_iter_dataset(read threads)
      -> mp_prefetch(data.num_workers) or a prefetch thread

Each element of the MapDataset is a whole host batch, so Grain's worker processes split the
stream by batches and the batches are the same with and without workers. The data position
is one integer, the next global position (`start`; `step * B` after `step` steps), which
every process count reads the same: the trainer checkpoints that instead of Grain's
per-process iterator state.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from bdpo_jax import schema

# Numeric fields of a batch with their dtypes: the schema's batch fields, plus the global
# record index of every pair.
BATCH_DTYPES = {name: np.dtype(schema.ARRAY_FIELDS[name][0]) for name in schema.BATCH_FIELDS}
BATCH_DTYPES["index"] = np.dtype(np.int64)
_MAX_BATCHES = 2**62  # the stream is endless: host batches 0 .. 2**62 - 1
_TIE_SALT = 0x7F4A7C159E3779B9


# --- per-record randomness (a function of the global position only) ------------------------


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a cheap, well-mixed hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def choose_views(seed: int, position: int, views: int) -> tuple[int, int]:
    """Views for image 0 and image 1 at global `position`: independent fair coins."""
    if views == 1:
        return 0, 0
    bits = _mix64(_mix64(seed) ^ position)
    return bits & 1, (bits >> 1) & 1


def replacement_index(seed: int, position: int, attempt: int, num_records: int) -> int:
    """The record drawn for a tie at global `position` (attempt 1, 2, ...)."""
    return _mix64(_mix64(_mix64(seed ^ _TIE_SALT) ^ position) ^ attempt) % num_records


def keep_record(record: Mapping[str, Any], label_mode: str) -> bool:
    """False for a pair whose label in `label_mode` is a tie (or missing)."""
    if label_mode == "majority":
        return int(record["label"]) != 0
    if label_mode == "human":
        human = float(record["human_label"])
        return human == human and human != 0.0  # drops NaN and 0
    return True


def contiguous_rows(global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Rows of the global batch of process `process_index` of `process_count`: one slice."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index/process_count {process_index}/{process_count}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    size = global_batch_size // process_count
    return np.arange(process_index * size, (process_index + 1) * size)


# --- reading one host batch -----------------------------------------------------------------


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


class _ReadBatch:
    """Host batch number t -> the stacked elements of this host's rows of global batch t."""

    def __init__(self, source, *, order, start, global_batch_size, rows, decode, seed, flip,
                 label_mode):  # fmt: skip
        self.source, self.order, self.start = source, order, int(start)
        self.global_batch_size, self.rows = int(global_batch_size), [int(r) for r in rows]
        self.decode, self.seed, self.flip, self.label_mode = decode, seed, flip, label_mode
        self.num_records = len(source)
        self.limit = max(self.num_records, 64)

    def _record(self, index: int) -> dict:
        record = self.source[index]
        return schema.decode_record(record) if self.decode else record

    def element(self, position: int) -> dict:
        """The batch element at global `position` (a function of the position and seed only)."""
        index = int(self.order[position])
        record = self._record(index)
        attempt = 0
        while self.label_mode is not None and not keep_record(record, self.label_mode):
            attempt += 1
            if attempt > self.limit:
                raise ValueError(
                    f"{attempt} records in a row are ties for label mode {self.label_mode!r}; "
                    "the data has no usable pairs for this mode "
                    "(set --config.data.drop_tied_labels=False to keep ties)"
                )
            index = replacement_index(self.seed, position, attempt, self.num_records)
            record = self._record(index)
        views = record["moments_0"].shape[0] if self.flip else 1
        v0, v1 = choose_views(self.seed, position, views)
        return _batch_element(record, index, v0, v1)

    def __call__(self, t: int) -> dict:
        first = self.start + int(t) * self.global_batch_size
        elements = [self.element(first + r) for r in self.rows]
        return {name: np.stack([e[name] for e in elements]) for name in elements[0]}


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
    global_batch_size: int,
    seed: int,
    label_mode: str,
    rows: Sequence[int],
    decode: bool,
    start: int = 0,
) -> grain.IterDataset:
    """This host's batches (its `rows` of every global batch) over a random-access `source`
    of records (bytes when `decode`), from global position `start` on."""
    rows = np.asarray(rows, np.int64)
    if global_batch_size < 1:
        raise ValueError(f"global batch size must be positive, got {global_batch_size}")
    if not len(rows) or np.any(np.diff(rows) <= 0) or rows[0] < 0:
        raise ValueError(f"rows must be ascending and non-empty, got {rows.tolist()}")
    if rows[-1] >= global_batch_size:
        raise ValueError(f"row {rows[-1]} is outside the global batch of {global_batch_size}")
    if start < 0:
        raise ValueError(f"the data position must be >= 0, got {start}")
    seed = int(seed) % 2**32
    order = grain.MapDataset.range(len(source))
    if data_config.shuffle:
        order = order.shuffle(seed=seed)
    read_batch = _ReadBatch(
        source,
        order=order.repeat(),
        start=start,
        global_batch_size=global_batch_size,
        rows=rows,
        decode=decode,
        seed=seed,
        flip=bool(data_config.random_flip),
        label_mode=label_mode if data_config.drop_tied_labels else None,
    )
    ds = grain.MapDataset.range(_MAX_BATCHES).map(read_batch)
    threads = int(data_config.get("read_threads", 0))
    ids = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(int(data_config.prefetch), threads, 1)
        )
    )
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
