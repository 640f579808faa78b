"""Synthetic pairs (config.data.source = 'synthetic') through the shards' pipeline."""

import numpy as np
import pytest

from bdpo_jax import data, schema
from bdpo_jax.data import synthetic
from configs.default import get_config


def _config(**overrides):
    config = get_config().data
    config.source = "synthetic"
    config.prefetch = 0
    config.drop_tied_labels = False
    config.update(overrides)
    return config


def _batches(config, n, batch=4, seed=0):
    dataset, _ = data.make_dataset(
        config, global_batch_size=batch, seed=seed, label_mode="majority"
    )
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_records_are_deterministic_and_consistent():
    config = _config(
        synthetic_num_records=24,
        synthetic_num_scorers=3,
        synthetic_pooled_dim=7,
    )
    batches = _batches(config, 6, batch=4, seed=5)
    again = _batches(config, 6, batch=4, seed=5)
    _assert_same_batches(batches, again)
    other = _batches(config, 1, batch=4, seed=6)[0]
    assert not np.array_equal(other["text_embeds"], batches[0]["text_embeds"])
    epoch = np.concatenate([b["index"] for b in batches])
    assert sorted(epoch) == list(range(24))
    batch = batches[0]
    assert batch["moments_0"].shape == (4, 2, 4, 8, 8) and batch["moments_0"].dtype == np.float16
    assert batch["pooled_text_embeds"].shape == (4, 7)
    assert batch["add_time_ids"].shape == (4, 6) and batch["add_time_ids"].dtype == np.float32
    for b in batches:
        for j in range(4):  # Eq. 6/7 by hand
            s0, s1 = b["scores"][j, :, 0], b["scores"][j, :, 1]
            votes = [1 if a >= c else -1 for a, c in zip(s0, s1, strict=True)]
            assert list(b["votes"][j]) == votes and b["margin"][j] == sum(votes)
            assert b["label"][j] == (1 if sum(votes) > 0 else -1)  # K = 3: no ties
        assert set(b["human_label"]) <= {1.0, -1.0}
    _, info = data.make_dataset(config, global_batch_size=4, seed=5, label_mode="majority")
    assert info.num_records == 24 and info.num_scorers == 3 and info.pooled_dim == 7
    assert info.empty_text_embeds.shape == (8, 32) and not info.empty_text_embeds.any()
    assert info.score_mean.shape == info.score_std.shape == (3,)
    assert synthetic.synthetic_dataset_info(config).scorer_names == info.scorer_names
    all_scores = np.concatenate([b["scores"] for b in batches])  # [24, K, 2]
    z = (all_scores - info.score_mean[None, :, None]) / info.score_std[None, :, None]
    assert abs(z.mean()) < 0.5 and 0.6 < z.std() < 1.4  # the stats describe the scores


def test_records_follow_the_schema_and_its_vote_rule():
    source = synthetic.SyntheticSource(16, (4, 8, 8), (8, 32), 4, 12, seed=3)
    for index in range(len(source)):
        record = source[index]
        decoded = schema.decode_record(schema.encode_record(record))  # validates the fields
        assert {k: v.dtype for k, v in decoded.items() if k not in schema.STRING_FIELDS} == {
            k: np.dtype(schema.ARRAY_FIELDS[k][0]) for k in schema.BATCH_FIELDS
        }
        votes_1xK = schema.votes_from_scores(record["scores"][None])
        label_1, margin_1 = schema.majority(votes_1xK)
        np.testing.assert_array_equal(record["votes"], votes_1xK[0])
        assert record["label"] == label_1[0] and record["margin"] == margin_1[0]
    np.testing.assert_array_equal(source[5]["scores"], source[5]["scores"])
    assert source[5]["prompt"] == "synthetic prompt 5"
    with pytest.raises(IndexError):
        source[16]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"synthetic_num_records": 0}, "config.data.synthetic_num_records"),
        ({"synthetic_latent_shape": (4, 8)}, "config.data.synthetic_latent_shape"),
    ],
)
def test_bad_config_is_a_user_error(overrides, field):
    with pytest.raises(schema.UserError, match=field):
        data.synthetic_dataset_info(_config(**overrides))
