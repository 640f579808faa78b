"""`make_dataset`: the training batches of `config.data` (shards or synthetic) and their info."""

from __future__ import annotations

import grain

from bdpo_jax.data import manifest, synthetic
from bdpo_jax.data.manifest import DataConfigError, DatasetInfo
from bdpo_jax.data.pipeline import build_pipeline


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
        return synthetic.make_synthetic_dataset(
            data_config,
            global_batch_size=global_batch_size,
            seed=seed,
            label_mode=label_mode,
            process_index=process_index,
            process_count=process_count,
        )
    if data_config.source != "shards":
        raise DataConfigError(
            f"unknown config.data.source {data_config.source!r}: expected 'shards' or 'synthetic'"
        )
    info = manifest.read_dataset_info(data_config.path)
    dataset = build_pipeline(
        manifest.open_shards(data_config.path, info),
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
