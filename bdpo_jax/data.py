"""Grain input pipeline over the preprocessed ArrayRecord shards (see `bdpo_jax.schema`).

Pipeline (one per process):

    MapDataset.source(all shards, in manifest order)   global record index 0..N-1
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
import dataclasses
import glob
import json
import logging
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from bdpo_jax import schema

# Numeric fields a batch carries (prompt strings stay out), with their batch dtypes.
BATCH_DTYPES = {
    "moments_0": np.float16,
    "moments_1": np.float16,
    "text_embeds": np.float16,
    "pooled_text_embeds": np.float16,
    "add_time_ids": np.float32,
    "scores": np.float32,
    "votes": np.int8,
    "label": np.int8,
    "margin": np.int8,
    "human_label": np.float32,
    "index": np.int64,
}
_SAME_IN_EVERY_MANIFEST = (
    "schema_version",
    "scorer_names",
    "latent_shape",
    "text_shape",
    "pooled_dim",
    "views",
    "vae_scaling_factor",
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about the data."""

    scorer_names: tuple[str, ...]
    latent_shape: tuple[int, int, int]  # [C, H, W] of one latent
    text_shape: tuple[int, int]  # [L, D] of text_embeds
    pooled_dim: int | None  # P of pooled_text_embeds (SDXL), else None
    views: int  # V stored views per image (2: the flipped image too)
    vae_scaling_factor: float
    num_records: int  # pairs in the whole data set (all hosts)
    score_mean: np.ndarray  # [K] per-scorer score mean (normalised-sum label mode)
    score_std: np.ndarray  # [K]
    empty_text_embeds: np.ndarray  # [L, D] embedding of "" (conditioning dropout)
    empty_pooled_text_embeds: np.ndarray | None  # [P]

    @property
    def num_scorers(self) -> int:
        return len(self.scorer_names)


# --- manifest and shard discovery -----------------------------------------------------------


def _merge_counts(total: dict, counts: Mapping) -> None:
    for key, value in counts.items():
        if isinstance(value, Mapping):
            _merge_counts(total.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
        else:
            total.setdefault(key, value)


def _merge_score_stats(manifests: Sequence[tuple[str, dict]]) -> dict[str, dict[str, float]]:
    """Pool per-worker score mean/std, weighting each worker by its record count."""
    sums: dict[str, list[float]] = {}
    for file, manifest in manifests:
        weight = sum(int(shard["num_records"]) for shard in manifest["shards"])
        for name, stats in (manifest.get("score_stats") or {}).items():
            try:
                mean, std = float(stats["mean"]), float(stats["std"])
            except (KeyError, TypeError) as error:
                raise schema.SchemaError(
                    f"{file}: score_stats[{name!r}] needs 'mean' and 'std'"
                ) from error
            acc = sums.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += weight
            acc[1] += weight * mean
            acc[2] += weight * (std**2 + mean**2)
    merged = {}
    for name, (weight, first, second) in sums.items():
        mean = first / weight if weight else 0.0
        var = second / weight - mean**2 if weight else 1.0
        merged[name] = {"mean": mean, "std": math.sqrt(max(var, 0.0))}
    return merged


def read_manifest(path: str) -> dict[str, Any]:
    """Read and merge every `manifest*.json` of a shard folder.

    Workers' manifests must agree on the schema fields; their shard lists are
    concatenated (sorted by manifest file name) and their counts summed.
    """
    if not path:
        raise FileNotFoundError("data path is empty: set --config.data.path to a shard folder")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data path {path!r} does not exist or is not a folder")
    files = sorted(glob.glob(os.path.join(glob.escape(path), "manifest*.json")))
    if not files:
        raise FileNotFoundError(
            f"no manifest*.json in {path!r}: is it the output folder of "
            "`python -m scorers_torch.preprocess`?"
        )
    manifests = []
    for file in files:
        try:
            with open(file) as f:
                manifest = json.load(f)
        except json.JSONDecodeError as error:
            raise schema.SchemaError(f"{file}: not valid JSON ({error})") from error
        schema.check_manifest_version(manifest, file)
        for key in _SAME_IN_EVERY_MANIFEST[1:] + ("shards",):
            if key not in manifest:
                raise schema.SchemaError(f"{file}: missing manifest field {key!r}")
        manifests.append((file, manifest))
    first_file, merged = files[0], dict(manifests[0][1])
    merged["shards"], merged["counts"] = [], {}
    for file, manifest in manifests:
        for key in _SAME_IN_EVERY_MANIFEST:
            if manifest[key] != merged[key]:
                raise schema.SchemaError(
                    f"{file}: {key}={manifest[key]!r} disagrees with {first_file}: {merged[key]!r}"
                )
        merged["shards"].extend(manifest["shards"])
        _merge_counts(merged["counts"], manifest.get("counts") or {})
    merged["score_stats"] = _merge_score_stats(manifests)
    merged["manifest_files"] = files
    return merged


def _shard_paths(path: str, manifest: Mapping) -> list[str]:
    shards = [shard for shard in manifest["shards"] if int(shard["num_records"]) > 0]
    if not shards:
        raise schema.SchemaError(
            f"{path!r}: the manifest lists no shard with records (empty shard set)"
        )
    paths = [os.path.join(path, shard["name"]) for shard in shards]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"shards listed in the manifest are missing: {missing[:5]}")
    return paths


def _load_empty_prompt(path: str, text_shape, pooled_dim) -> tuple[np.ndarray, np.ndarray | None]:
    file = os.path.join(path, schema.EMPTY_PROMPT_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} is missing (text embeddings of the empty prompt)")
    with np.load(file) as npz:
        text = np.asarray(npz["text_embeds"], np.float16)
        pooled = npz["pooled_text_embeds"] if "pooled_text_embeds" in npz else None
    if text.shape != tuple(text_shape):
        raise schema.SchemaError(
            f"{file}: text_embeds shape {text.shape} != manifest text_shape {tuple(text_shape)}"
        )
    if pooled_dim is not None:
        if pooled is None or np.shape(pooled) != (pooled_dim,):
            raise schema.SchemaError(
                f"{file}: needs pooled_text_embeds of shape ({pooled_dim},) "
                f"(manifest pooled_dim), got {None if pooled is None else np.shape(pooled)}"
            )
        pooled = np.asarray(pooled, np.float16)
    else:
        pooled = None
    return text, pooled


def read_dataset_info(path: str) -> DatasetInfo:
    """Describe the shard folder `path` (merged manifests + empty-prompt embedding)."""
    manifest = read_manifest(path)
    _shard_paths(path, manifest)
    names = tuple(manifest["scorer_names"])
    stats = manifest["score_stats"]
    missing = [name for name in names if name not in stats]
    if missing:
        raise schema.SchemaError(f"{path!r}: manifest score_stats lack scorers {missing}")
    if manifest["views"] not in (1, 2):
        raise schema.SchemaError(
            f"{path!r}: manifest views must be 1 or 2, got {manifest['views']}"
        )
    if len(manifest["latent_shape"]) != 3 or len(manifest["text_shape"]) != 2:
        raise schema.SchemaError(
            f"{path!r}: manifest latent_shape must be [C, H, W] and text_shape [L, D], got "
            f"{manifest['latent_shape']} and {manifest['text_shape']}"
        )
    pooled_dim = None if manifest["pooled_dim"] in (None, 0) else int(manifest["pooled_dim"])
    empty_text, empty_pooled = _load_empty_prompt(path, manifest["text_shape"], pooled_dim)
    return DatasetInfo(
        scorer_names=names,
        latent_shape=tuple(int(x) for x in manifest["latent_shape"]),
        text_shape=tuple(int(x) for x in manifest["text_shape"]),
        pooled_dim=pooled_dim,
        views=int(manifest["views"]),
        vae_scaling_factor=float(manifest["vae_scaling_factor"]),
        num_records=sum(int(shard["num_records"]) for shard in manifest["shards"]),
        score_mean=np.array([stats[n]["mean"] for n in names], np.float32),
        score_std=np.array([stats[n]["std"] for n in names], np.float32),
        empty_text_embeds=empty_text,
        empty_pooled_text_embeds=empty_pooled,
    )


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


def _check_writer_options(shard: str) -> None:
    """Warn when a shard's layout makes random access slow (chunks of several records)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(shard)
    options = dict(
        item.split(":", 1) for item in reader.writer_options_string().split(",") if ":" in item
    )
    reader.close()
    if int(options.get("group_size", "1")) > 1:
        logging.warning(
            "%s was written with group_size:%s: every random read decodes that many records. "
            "Write shards with ArrayRecordWriter(path, 'group_size:1,uncompressed').",
            shard,
            options["group_size"],
        )


def _open_source(path: str, info: DatasetInfo) -> grain.sources.ArrayRecordDataSource:
    paths = _shard_paths(path, read_manifest(path))
    _check_writer_options(paths[0])
    source = grain.sources.ArrayRecordDataSource(paths)
    if len(source) != info.num_records:
        raise schema.SchemaError(
            f"{path!r}: the shards hold {len(source)} records but the manifest says "
            f"{info.num_records}; a shard is incomplete or the manifest is stale"
        )
    return source


def read_records(path: str, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Fully decoded records (prompt strings included) by global record index."""
    source = grain.sources.ArrayRecordDataSource(_shard_paths(path, read_manifest(path)))
    out = []
    for index in indices:
        if not 0 <= int(index) < len(source):
            raise IndexError(f"record index {index} out of range [0, {len(source)})")
        out.append(schema.decode_record(source[int(index)]))
    return out


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


def make_dataset(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    label_mode: str,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[grain.IterDataset, DatasetInfo]:
    """The training batches of `data_config` (`source` 'shards' or 'synthetic') and their info.

    Each host calls this with its own `process_index` (jax.process_index()) and gets
    batches of `global_batch_size // process_count` pairs: a disjoint share of every epoch.
    """
    if data_config.source == "synthetic":
        return make_synthetic_dataset(
            data_config,
            global_batch_size=global_batch_size,
            seed=seed,
            label_mode=label_mode,
            process_index=process_index,
            process_count=process_count,
        )
    if data_config.source != "shards":
        raise ValueError(
            f"unknown data.source {data_config.source!r}: expected 'shards' or 'synthetic'"
        )
    info = read_dataset_info(data_config.path)
    dataset = build_pipeline(
        _open_source(data_config.path, info),
        data_config=data_config,
        num_records=info.num_records,
        global_batch_size=global_batch_size,
        seed=seed,
        label_mode=label_mode,
        process_index=process_index,
        process_count=process_count,
        decode=True,
    )
    return dataset, info


def make_synthetic_dataset(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    label_mode: str,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[grain.IterDataset, DatasetInfo]:
    """Same as `make_dataset` on records made in-process (see `bdpo_jax.synthetic`)."""
    from bdpo_jax import synthetic  # synthetic imports this module

    return synthetic.make_synthetic_dataset(
        data_config,
        global_batch_size=global_batch_size,
        seed=seed,
        label_mode=label_mode,
        process_index=process_index,
        process_count=process_count,
    )


# --- checkpointing and placement ------------------------------------------------------------


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


def to_global_batch(batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Global jax.Arrays from this process's batch; the leading axis sharded by `sharding`.

    With P processes the global batch is P times the local one, ordered by process.
    """
    import jax  # this module stays importable without initialising JAX

    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in batch.items()
    }
