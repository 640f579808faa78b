"""Synthetic preference pairs made in-process (data.source = 'synthetic').

Backs configs/tiny.py and the trainer's CPU tests: no files, deterministic from the seed,
cheap. Records have the keys and dtypes of `bdpo_jax.schema` and go through the same Grain
pipeline as the shards (`bdpo_jax.data.make_dataset`), so shuffling, multi-host
slicing, tie filtering, batching and iterator checkpoints behave exactly as with real data.

Scores are random, on deliberately different scales per scorer (like PickScore, HPS,
CLIP and Aesthetic); votes, label and margin follow the paper's Eq. 6/7 from those scores
(`schema.votes_from_scores` and `schema.majority`, the rule the preprocessing uses).
"""

from __future__ import annotations

import grain
import numpy as np

from bdpo_jax import schema
from bdpo_jax.data.manifest import DataConfigError, DatasetInfo

VAE_SCALING_FACTOR = 0.18215  # SD1.5's; synthetic latents are N(0, 1) after scaling
_BASE_MEANS = np.array([0.19, 0.27, 0.37, 4.5], np.float64)  # P, H, C, A-like scales


def score_stats(num_scorers: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-scorer mean and std of the synthetic score distribution ([K] each)."""
    k = np.arange(num_scorers)
    mean_K = _BASE_MEANS[k % len(_BASE_MEANS)] * (1 + k // len(_BASE_MEANS))
    return mean_K.astype(np.float32), (0.1 * mean_K).astype(np.float32)


class SyntheticSource(grain.sources.RandomAccessDataSource):
    """Random-access source of decoded records; record i depends only on (seed, i)."""

    def __init__(
        self,
        num_records: int,
        latent_shape: tuple[int, int, int],
        text_shape: tuple[int, int],
        num_scorers: int,
        pooled_dim: int | None,
        seed: int,
        num_time_ids: int = 6,
    ):
        if num_records < 1 or num_scorers < 1:
            raise DataConfigError(
                "config.data.synthetic_num_records and config.data.synthetic_num_scorers must "
                f"be >= 1, got {num_records} and {num_scorers}"
            )
        self.num_records, self.num_scorers = int(num_records), int(num_scorers)
        self.latent_shape = tuple(int(x) for x in latent_shape)
        self.text_shape = tuple(int(x) for x in text_shape)
        self.pooled_dim, self.seed = pooled_dim, int(seed)
        if num_time_ids not in (5, 6):
            raise DataConfigError(
                "config.data.synthetic_num_time_ids must be 6 (SDXL, Kolors) or 5 (SDXL "
                f"refiner), got {num_time_ids}"
            )
        self.num_time_ids = int(num_time_ids)
        if len(self.latent_shape) != 3 or len(self.text_shape) != 2:
            raise DataConfigError(
                "config.data.synthetic_latent_shape must be (C, H, W) and "
                f"config.data.synthetic_text_shape (L, D), got {latent_shape} and {text_shape}"
            )

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        return f"SyntheticSource(num_records={self.num_records}, seed={self.seed})"

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"synthetic record {index} out of range [0, {self.num_records})")
        rng = np.random.default_rng([self.seed, index])
        c, h, w = self.latent_shape

        def moments():  # [V=1, 2, C, H, W]: latent mean and log-variance, unscaled
            mean = rng.standard_normal((1, 1, c, h, w)) / VAE_SCALING_FACTOR
            logvar = np.full((1, 1, c, h, w), -6.0)
            return np.concatenate([mean, logvar], axis=1).astype(np.float16)

        mean_K, std_K = score_stats(self.num_scorers)
        scores = mean_K[:, None] + std_K[:, None] * rng.standard_normal((self.num_scorers, 2))
        scores = scores.astype(np.float32)
        votes_1xK = schema.votes_from_scores(scores[None])
        label_1, margin_1 = schema.majority(votes_1xK)
        record = {
            "pair_id": f"synthetic-{index}",
            "prompt": f"synthetic prompt {index}",
            "moments_0": moments(),
            "moments_1": moments(),
            "text_embeds": rng.standard_normal(self.text_shape).astype(np.float16),
            "scores": scores,
            "votes": votes_1xK[0],
            "label": label_1[0],
            "margin": margin_1[0],
            "human_label": np.float32(rng.choice([-1.0, 1.0])),
        }
        if self.pooled_dim:
            record["pooled_text_embeds"] = rng.standard_normal(self.pooled_dim).astype(np.float16)
            size = [8 * h, 8 * w]  # original size, crop (top, left), then target size (6) or
            last = size if self.num_time_ids == 6 else [6.0]  # the refiner's aesthetic score (5)
            record["add_time_ids"] = np.array(size + [0, 0] + last, np.float32)
        return record


def _source_and_info(data_config, seed: int) -> tuple[SyntheticSource, DatasetInfo]:
    pooled_dim = int(data_config.get("synthetic_pooled_dim", 0)) or None
    source = SyntheticSource(
        num_records=int(data_config.synthetic_num_records),
        latent_shape=tuple(data_config.synthetic_latent_shape),
        text_shape=tuple(data_config.synthetic_text_shape),
        num_scorers=int(data_config.synthetic_num_scorers),
        pooled_dim=pooled_dim,
        seed=seed,
        num_time_ids=int(data_config.get("synthetic_num_time_ids", 6)),
    )
    mean_K, std_K = score_stats(source.num_scorers)
    info = DatasetInfo(
        scorer_names=tuple(f"synthetic_{k}" for k in range(source.num_scorers)),
        latent_shape=source.latent_shape,
        text_shape=source.text_shape,
        pooled_dim=pooled_dim,
        views=1,
        vae_scaling_factor=VAE_SCALING_FACTOR,
        num_records=source.num_records,
        score_mean=mean_K,
        score_std=std_K,
        empty_text_embeds=np.zeros(source.text_shape, np.float16),
        empty_pooled_text_embeds=np.zeros(pooled_dim, np.float16) if pooled_dim else None,
    )
    return source, info


def synthetic_dataset_info(data_config, seed: int = 0) -> DatasetInfo:
    """The DatasetInfo of the synthetic data of `data_config` (no records made)."""
    return _source_and_info(data_config, seed)[1]


def synthetic_source(data_config, seed: int = 0) -> tuple[SyntheticSource, DatasetInfo]:
    """The random-access source of the synthetic records of `data_config` and their info."""
    return _source_and_info(data_config, seed)
