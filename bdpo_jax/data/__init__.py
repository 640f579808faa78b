"""Training data: preprocessed ArrayRecord shards or in-process synthetic pairs, via Grain.

    manifest.py   a shard folder (config.data.path): merged manifests, DatasetInfo, records
    pipeline.py   the Grain pipeline: shuffle, repeat, per-host slice, views, ties, batch
    synthetic.py  synthetic records (config.data.source = 'synthetic') for CPU runs
    dataset.py    make_dataset: config.data -> (batches, DatasetInfo)

The record layout, batch field names and vote rule live in `bdpo_jax.schema`; placing a
host's batch on the devices is `bdpo_jax.sharding.to_global_batch`.
"""

from bdpo_jax.data.dataset import make_dataset
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
    data_iterator_checkpoint_args,
    keep_record,
)
from bdpo_jax.data.synthetic import make_synthetic_dataset, synthetic_dataset_info

__all__ = [
    "BATCH_DTYPES",
    "DataConfigError",
    "DataPathError",
    "DatasetInfo",
    "build_pipeline",
    "choose_views",
    "data_iterator_checkpoint_args",
    "keep_record",
    "make_dataset",
    "make_synthetic_dataset",
    "open_shards",
    "read_dataset_info",
    "read_manifest",
    "read_records",
    "synthetic_dataset_info",
]
