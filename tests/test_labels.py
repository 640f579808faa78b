"""bdpo_jax.labels: every label mode worked out by hand on one small batch."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bdpo_jax import labels, schema

NAMES = ("a", "b", "c")  # three scorers on very different scales: 0-1, 0-100, 1-10
# scores [B=4, K=3, 2] (image 1, image 2)
SCORES = np.array(
    [
        [[0.6, 0.4], [40.0, 60.0], [5.5, 5.0]],  # votes +1 -1 +1 -> majority +1
        [[0.3, 0.5], [70.0, 20.0], [4.0, 4.5]],  # votes -1 +1 -1 -> majority -1
        [[0.5, 0.5], [10.0, 11.0], [6.0, 7.0]],  # votes +1 (tie: >=) -1 -1 -> majority -1
        [[0.9, 0.1], [55.0, 50.0], [3.0, 2.0]],  # votes +1 +1 +1 -> majority +1
    ],
    np.float32,
)
VOTES = np.array([[1, -1, 1], [-1, 1, -1], [1, -1, -1], [1, 1, 1]], np.int8)
MAJORITY = np.array([1, -1, -1, 1], np.int8)
MARGIN = np.array([1, -1, -1, 3], np.int8)
HUMAN = np.array([1.0, np.nan, -1.0, 0.0], np.float32)
STD = np.array([0.2, 20.0, 1.0], np.float32)


def _batch():
    return {
        "scores": SCORES,
        "votes": VOTES,
        "label": MAJORITY,
        "margin": MARGIN,
        "human_label": HUMAN,
    }


def _label(mode, scorer="", weights=None, score_std=STD, rng=None, batch=None, **smpo):
    """label_fn(batch, weights_K, score_std_K, rng) of `mode`; weights default to the mode's."""
    label_fn = labels.make_label_fn(mode, NAMES, scorer=scorer, **smpo)
    if weights is None:
        weights = labels.label_weights(mode, NAMES, scorer)
    return np.asarray(label_fn(_batch() if batch is None else batch, weights, score_std, rng))


def test_batch_is_self_consistent():
    # the votes above follow Eq. 6 from the scores, the majority Eq. 7
    np.testing.assert_array_equal(np.where(SCORES[..., 0] >= SCORES[..., 1], 1, -1), VOTES)
    np.testing.assert_array_equal(np.sign(VOTES.sum(1)), MAJORITY)
    np.testing.assert_array_equal(VOTES.sum(1), MARGIN)


def test_majority_single_human_soft_vote():
    np.testing.assert_array_equal(_label("majority"), [1, -1, -1, 1])
    assert _label("majority").dtype == np.float32
    np.testing.assert_array_equal(_label("single", scorer="a"), [1, -1, 1, 1])
    np.testing.assert_array_equal(_label("single", scorer="b"), [-1, 1, -1, 1])
    np.testing.assert_array_equal(_label("single", scorer="c"), [1, -1, -1, 1])
    # 'single' picks its scorer by a runtime one-hot: the label function is the same for all
    np.testing.assert_array_equal(labels.label_weights("single", NAMES, "b"), [0, 1, 0])
    np.testing.assert_array_equal(_label("single", weights=np.float32([0, 0, 1])), VOTES[:, 2])
    with pytest.raises(ValueError, match="config.label.scorer='z'"):
        labels.label_weights("single", NAMES, "z")
    np.testing.assert_array_equal(_label("human"), [1, 0, -1, 0])  # NaN: no human label -> 0
    np.testing.assert_allclose(_label("soft_vote"), [1 / 3, -1 / 3, -1 / 3, 1.0], rtol=1e-6)


def test_weighted_sum_returns_per_scorer_votes():
    out = _label("weighted_sum", weights=np.array([0.5, 0.25, 0.25]))
    assert out.shape == (4, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, VOTES)


def test_score_sum_follows_the_largest_scale_scorer_and_majority_does_not():
    # raw score differences, pair 0: +0.2 - 20 + 0.5 = -19.3 -> -1; pair 1: -0.2 + 50 - 0.5 -> +1
    # pair 2: 0 - 1 - 1 -> -1; pair 3: 0.8 + 5 + 1 -> +1
    score_sum = _label("score_sum")
    np.testing.assert_array_equal(score_sum, [-1, 1, -1, 1])
    np.testing.assert_array_equal(score_sum, VOTES[:, 1])  # = scorer b, the 0-100 one
    assert np.any(_label("majority") != VOTES[:, 1])
    # with weights that silence b, c decides pairs 0 and 1: 0.2 + 0.5 > 0, -0.2 - 0.5 < 0
    np.testing.assert_array_equal(_label("score_sum", weights=np.array([1.0, 0.0, 1.0])),
                                  [1, -1, -1, 1])  # fmt: skip


def test_normalized_sum_divides_by_dataset_std():
    # pair 0: 0.2/0.2 - 20/20 + 0.5/1 = 0.5 -> +1; pair 1: -1 + 2.5 - 0.5 = 1.0 -> +1
    # pair 2: 0 - 0.05 - 1 -> -1; pair 3: 4 + 0.25 + 1 -> +1
    np.testing.assert_array_equal(_label("normalized_sum", score_std=STD), [1, 1, -1, 1])
    # a zero-spread scorer contributes nothing (no division by zero)
    std0 = np.array([0.2, 0.0, 1.0], np.float32)
    np.testing.assert_array_equal(_label("normalized_sum", score_std=std0), [1, -1, -1, 1])
    with pytest.raises(ValueError, match="score_std"):
        _label("normalized_sum", score_std=STD[:2])


def test_random_scorer_labels_the_batch_with_one_uniformly_drawn_scorer():
    fn = jax.jit(labels.make_label_fn("random_scorer", NAMES))
    weights = labels.label_weights("random_scorer", NAMES)
    picks = []
    for i in range(300):
        out = np.asarray(fn(_batch(), weights, STD, jax.random.key(i)))
        matches = [k for k in range(3) if np.array_equal(out, VOTES[:, k])]
        assert len(matches) == 1, out  # the columns of VOTES are distinct
        picks.append(matches[0])
    counts = np.bincount(picks, minlength=3)
    assert np.all(np.abs(counts - 100) < 35), counts


def test_smpo_label():
    lo, hi, scale = labels.SMPO_LO, labels.SMPO_HI, labels.SMPO_SCALE
    out = _label("smpo", scorer="a", smpo_lo=lo, smpo_hi=hi, smpo_scale=scale)
    # by hand: n = (s - lo) / (hi - lo); p = 1 / (1 + exp(-(n1 - n2))); label = (2p - 1) * 10
    d = (SCORES[:, 0, 0].astype(np.float64) - SCORES[:, 0, 1]) / (hi - lo)
    expected = (2.0 / (1.0 + np.exp(-d)) - 1.0) * scale
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert out[2] == 0.0  # equal scores: p = 0.5, no gradient
    np.testing.assert_allclose(out[0], 10 * np.tanh(0.2 / (hi - lo) / 2), rtol=1e-5)
    # lo = 0, hi = 1, scale 1 on pair 3: (2 sigmoid(0.8) - 1) = tanh(0.4)
    out01 = _label("smpo", scorer="a", smpo_lo=0.0, smpo_hi=1.0, smpo_scale=1.0)
    np.testing.assert_allclose(out01[3], 0.379948962, rtol=1e-5)


def test_sft_returns_the_majority_winner_index():
    out = _label("sft")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [0, 1, 1, 0])
    tie = dict(_batch(), label=np.array([0, 1, -1, 0], np.int8))
    np.testing.assert_array_equal(_label("sft", batch=tie), [0, 0, 1, 0])  # a tie: image 1


@pytest.mark.parametrize("mode", list(labels.MODES))
def test_every_mode_jits_with_traced_batch(mode):
    fn = labels.make_label_fn(mode, NAMES, scorer="c", smpo_lo=0.0, smpo_hi=10.0, smpo_scale=10.0)
    weights = jnp.array([0.2, 0.3, 0.5]) if mode in labels.WEIGHTED_MODES else None
    if weights is None:
        weights = jnp.asarray(labels.label_weights(mode, NAMES, "c"))
    args = (weights, jnp.asarray(STD), jax.random.key(0))
    eager = fn(_batch(), *args)
    jitted = jax.jit(fn)({k: jnp.asarray(v) for k, v in _batch().items()}, *args)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)


def test_make_label_fn_names_bad_config():
    with pytest.raises(schema.UserError, match=r"config.label.mode='best'"):
        labels.make_label_fn("best", NAMES)
    with pytest.raises(schema.UserError, match=r"config.label.scorer='hps'"):
        labels.make_label_fn("smpo", NAMES, scorer="hps")


def test_parse_weights():
    np.testing.assert_allclose(labels.parse_weights("", NAMES), [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(labels.parse_weights("a=2, c=0.5", NAMES), [2.0, 0.0, 0.5])
    assert labels.parse_weights("b=1", NAMES).dtype == np.float32
    with pytest.raises(ValueError, match=r"config.label.weights.*unknown scorer 'hps'"):
        labels.parse_weights("a=1,hps=2", NAMES)
    with pytest.raises(ValueError, match="config.label.weights.*not 'name=weight'"):
        labels.parse_weights("a:1", NAMES)
    with pytest.raises(ValueError, match="config.label.weights.*not a number"):
        labels.parse_weights("a=x", NAMES)
    with pytest.raises(ValueError, match="config.label.weights.*twice"):
        labels.parse_weights("a=1,a=2", NAMES)
    with pytest.raises(ValueError, match="config.label.weights.*>= 0"):
        labels.parse_weights("a=-1", NAMES)
    with pytest.raises(ValueError, match="config.label.weights.*positive sum"):
        labels.parse_weights("a=0", NAMES)


def _label_config(**fields):
    config = ml_collections.ConfigDict(
        {"mode": "majority", "scorer": "", "weights": "", "smpo_lo": labels.SMPO_LO,
         "smpo_hi": labels.SMPO_HI, "smpo_scale": labels.SMPO_SCALE, "tie_tolerance": 0.0}
    )  # fmt: skip
    config.update(fields)
    return config


def test_check_label_config():
    for mode in labels.MODES:
        scorer = "a" if mode in labels.SCORER_MODES else ""
        labels.check_label_config(_label_config(mode=mode, scorer=scorer), NAMES)
    with pytest.raises(ValueError, match=r"config.label.mode='best'.*majority.*smpo"):
        labels.check_label_config(_label_config(mode="best"), NAMES)
    with pytest.raises(ValueError, match=r"config.label.scorer='hps'.*\['a', 'b', 'c'\]"):
        labels.check_label_config(_label_config(mode="single", scorer="hps"), NAMES)
    with pytest.raises(ValueError, match="config.label.scorer=''"):
        labels.check_label_config(_label_config(mode="smpo"), NAMES)
    with pytest.raises(ValueError, match="config.label.weights.*unknown scorer 'x'"):
        labels.check_label_config(_label_config(mode="weighted_sum", weights="x=1"), NAMES)
    with pytest.raises(ValueError, match="config.label.smpo_lo"):
        labels.check_label_config(
            _label_config(mode="smpo", scorer="a", smpo_lo=0.3, smpo_hi=0.2), NAMES
        )
