"""Training data: preprocessed ArrayRecord shards or in-process synthetic pairs, via Grain.

    manifest.py   a shard folder (config.data.path): merged manifests, DatasetInfo, records
    pipeline.py   the Grain pipeline: the global order, this host's rows, views, ties, batches
    synthetic.py  synthetic records (config.data.source = 'synthetic') for CPU runs
    dataset.py    make_dataset: config.data -> (this host's batches, DatasetInfo)

The record layout, batch field names and vote rule live in `bdpo_jax.schema`; placing a
host's batch on the devices is `bdpo_jax.sharding.to_global_batch`.
"""

from bdpo_jax.data.dataset import dataset_info, make_dataset
from bdpo_jax.data.manifest import (
    DataConfigError,
    DataPathError,
    DatasetInfo,
    open_shards,
    read_dataset_info,
    read_manifest,
    read_records,
)
from bdpo_jax.data.pipeline import (
    BATCH_DTYPES,
    build_pipeline,
    choose_views,
    contiguous_rows,
    keep_record,
    replacement_index,
)
from bdpo_jax.data.synthetic import synthetic_dataset_info, synthetic_source

__all__ = [
    "BATCH_DTYPES",
    "DataConfigError",
    "DataPathError",
    "DatasetInfo",
    "build_pipeline",
    "choose_views",
    "contiguous_rows",
    "dataset_info",
    "keep_record",
    "make_dataset",
    "open_shards",
    "read_dataset_info",
    "read_manifest",
    "read_records",
    "replacement_index",
    "synthetic_dataset_info",
    "synthetic_source",
]
