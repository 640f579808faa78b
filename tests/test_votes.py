"""The vote rule of `bdpo_jax.schema` (votes, majority, tie policy, agreement) by hand."""

import numpy as np
import pytest

from bdpo_jax import schema


def test_votes_exact_tie_keeps_image_0_and_tolerance():
    scores = np.array(
        [
            [[1.0, 0.5], [0.2, 0.2], [0.1, 0.3]],  # win, exact tie -> +1, loss
            [[0.30, 0.31], [5.0, 6.0], [0.0, -1.0]],  # near tie (-1 without tolerance), loss, win
        ]
    )
    assert schema.votes_from_scores(scores).tolist() == [[1, 1, -1], [-1, -1, 1]]
    # tolerance 0.05: 0.30 >= 0.31 - 0.05 -> +1; 5 >= 6 - 0.05 is false -> -1
    assert schema.votes_from_scores(scores, 0.05).tolist() == [[1, 1, -1], [1, -1, 1]]
    assert schema.votes_from_scores(scores).dtype == np.int8


def test_votes_bad_shape_and_tolerance():
    with pytest.raises(ValueError, match=r"\[N, K, 2\]"):
        schema.votes_from_scores(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="tie_tolerance"):
        schema.votes_from_scores(np.zeros((1, 1, 2)), -1.0)


def test_majority_odd_and_even_k():
    label, margin = schema.majority(np.array([[1, 1, -1], [-1, -1, 1], [1, 1, 1]]))
    assert label.tolist() == [1, -1, 1] and margin.tolist() == [1, -1, 3]
    label, margin = schema.majority(np.array([[1, -1, 1, -1], [1, 1, 1, -1], [-1, -1, -1, -1]]))
    assert label.tolist() == [0, 1, -1] and margin.tolist() == [0, 2, -4]
    assert label.dtype == np.int8 and margin.dtype == np.int8


def test_tie_policies():
    label = np.array([0, 1, 0, 0, -1], np.int8)
    human = np.array([-1.0, -1.0, 0.0, np.nan, 1.0], np.float32)
    out, keep = schema.apply_tie_policy(label, human, "drop")
    assert out.tolist() == [0, 1, 0, 0, -1] and keep.tolist() == [False, True, False, False, True]
    out, keep = schema.apply_tie_policy(label, human, "keep")
    assert out.tolist() == [0, 1, 0, 0, -1] and keep.all()
    out, keep = schema.apply_tie_policy(label, human, "human")
    # the tied pair with human -1 takes it; human tie (0) and unknown (NaN) are dropped;
    # non-tied pairs keep the majority even when the human disagrees
    assert out.tolist() == [-1, 1, 0, 0, -1] and keep.tolist() == [True, True, False, False, True]
    with pytest.raises(ValueError, match="tie policy"):
        schema.apply_tie_policy(label, human, "coin")


def test_agreement_skips_ties_and_unknown():
    v = np.array([[1, 1], [1, -1], [-1, -1], [1, 1]], np.int8)
    ref = np.array([1.0, -1.0, 0.0, np.nan])
    fraction, count = schema.agreement(v, ref)
    assert count == 2
    np.testing.assert_allclose(fraction, [0.5, 1.0])  # scorer 0: 1/2, scorer 1: 2/2
    fraction, count = schema.agreement(v, np.array([0.0, np.nan, 0.0, 0.0]))
    assert count == 0 and np.isnan(fraction).all()
