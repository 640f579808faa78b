"""`make_dataset`: this host's training batches of `config.data` (shards or synthetic)."""

from __future__ import annotations

from collections.abc import Sequence

import grain

from bdpo_jax.data import manifest, synthetic
from bdpo_jax.data.manifest import DataConfigError, DatasetInfo
from bdpo_jax.data.pipeline import build_pipeline, contiguous_rows


def _check_source(data_config) -> None:
    if data_config.source not in ("shards", "synthetic"):
        raise DataConfigError(
            f"unknown config.data.source {data_config.source!r}: expected 'shards' or 'synthetic'"
        )


def dataset_info(data_config) -> DatasetInfo:
    """The DatasetInfo of `data_config` (no pipeline built, no record read)."""
    _check_source(data_config)
    if data_config.source == "synthetic":
        return synthetic.synthetic_dataset_info(data_config)
    return manifest.read_dataset_info(data_config.path)


def make_dataset(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    label_mode: str,
    rows: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    start: int = 0,
) -> tuple[grain.IterDataset, DatasetInfo]:
    """This host's batches of `data_config` (`source` 'shards' or 'synthetic') and their info.

    The global batch t holds the records at global positions start + t * B + r, r < B (see
    `pipeline`); this host gets the `rows` r it owns (ascending), by default the contiguous
    slice `process_index` of `process_count`. The trainer passes the rows its devices hold
    (`sharding.process_batch_rows`) and `start` from the checkpoint (`step * B`).
    """
    _check_source(data_config)
    if rows is None:
        rows = contiguous_rows(global_batch_size, process_index, process_count)
    if data_config.source == "synthetic":
        source, info = synthetic.synthetic_source(data_config, seed)
        decode = False
    else:
        info = manifest.read_dataset_info(data_config.path)
        source, decode = manifest.open_shards(data_config.path, info), True
    dataset = build_pipeline(
        source,
        data_config=data_config,
        global_batch_size=global_batch_size,
        seed=seed,
        label_mode=label_mode,
        rows=rows,
        decode=decode,
        start=start,
    )
    return dataset, info
