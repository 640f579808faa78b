"""A shard folder (`config.data.path`): its merged manifests, `DatasetInfo` and records.

The folder is what `python -m scorers_torch.preprocess` writes: one `manifest*.json` per
worker, the ArrayRecord shards they list, and the empty prompt's text embeddings (file names
and record layout in `bdpo_jax.schema`). Every problem with the folder is a `UserError` that
names the file and the config field, so the train CLI reports it as one line (the error
classes of `config.data` live here).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from bdpo_jax import schema

PATH_FIELD = "config.data.path"
_SAME_IN_EVERY_MANIFEST = (
    "schema_version",
    "scorer_names",
    "latent_shape",
    "text_shape",
    "pooled_dim",
    "views",
    "vae_scaling_factor",
)


class DataPathError(schema.UserError, FileNotFoundError):
    """`config.data.path` is empty, missing, or lacks a file the manifest promises."""


class DataConfigError(schema.UserError, ValueError):
    """A `config.data` field has a value the data code cannot use (named in the message)."""


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


def _load_manifest(file: str) -> dict:
    try:
        with open(file) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as error:
        raise schema.SchemaError(
            f"{file}: not valid JSON ({error}); is {PATH_FIELD} a finished preprocessing output?"
        ) from error
    if not isinstance(manifest, dict):
        raise schema.SchemaError(f"{file}: a manifest must be a JSON object")
    schema.check_manifest_version(manifest, file)
    for key in _SAME_IN_EVERY_MANIFEST[1:] + ("shards",):
        if key not in manifest:
            raise schema.SchemaError(f"{file}: missing manifest field {key!r}")
    return manifest


def read_manifest(path: str) -> dict[str, Any]:
    """Read and merge every `manifest*.json` of a shard folder.

    Workers' manifests must agree on the schema fields; their shard lists are
    concatenated (sorted by manifest file name) and their counts summed.
    """
    if not path:
        raise DataPathError(f"data path is empty: set --{PATH_FIELD} to a shard folder")
    if not os.path.isdir(path):
        raise DataPathError(f"{PATH_FIELD} {path!r} does not exist or is not a folder")
    files = sorted(glob.glob(os.path.join(glob.escape(path), "manifest*.json")))
    if not files:
        raise DataPathError(
            f"{PATH_FIELD}: no manifest*.json in {path!r}: is it the output folder of "
            "`python -m scorers_torch.preprocess`?"
        )
    manifests = [(file, _load_manifest(file)) for file in files]
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


def shard_paths(path: str, manifest: Mapping) -> list[str]:
    """Paths of the shards with records that `manifest` (of folder `path`) lists."""
    shards = [shard for shard in manifest["shards"] if int(shard["num_records"]) > 0]
    if not shards:
        raise schema.SchemaError(
            f"{PATH_FIELD} {path!r}: the manifest lists no shard with records (empty shard set)"
        )
    paths = [os.path.join(path, shard["name"]) for shard in shards]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataPathError(
            f"{PATH_FIELD} {path!r}: {len(missing)} shard(s) listed in the manifest are "
            f"missing: {missing[:5]}"
        )
    return paths


def _load_empty_prompt(path: str, text_shape, pooled_dim) -> tuple[np.ndarray, np.ndarray | None]:
    file = os.path.join(path, schema.EMPTY_PROMPT_NAME)
    if not os.path.isfile(file):
        raise DataPathError(
            f"{file} is missing (text embeddings of the empty prompt; {PATH_FIELD})"
        )
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
    shard_paths(path, manifest)
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


def open_shards(path: str, info: DatasetInfo) -> grain.sources.ArrayRecordDataSource:
    """Random-access source of the encoded records of folder `path`, checked against `info`."""
    paths = shard_paths(path, read_manifest(path))
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
    source = grain.sources.ArrayRecordDataSource(shard_paths(path, read_manifest(path)))
    out = []
    for index in indices:
        if not 0 <= int(index) < len(source):
            raise IndexError(f"record index {index} out of range [0, {len(source)})")
        out.append(schema.decode_record(source[int(index)]))
    return out
