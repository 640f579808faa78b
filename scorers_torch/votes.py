"""Per-scorer votes, the majority label and the tie policy (PAPER.md Eqs. 6-7), in numpy.

    s_k = +1 if r_k(x0) >= r_k(x1) - tol else -1      (Eq. 6; an exact tie keeps image 0,
                                                       as the Diffusion-DPO authors' code)
    margin = sum_k s_k,   label = sign(margin)        (Eq. 7; 0 = a tie when K is even)

Labels use the record convention: +1 = image 0 preferred, -1 = image 1, 0 = tie.
"""

from __future__ import annotations

import numpy as np

TIE_POLICIES = ("drop", "human", "keep")


def votes_from_scores(scores_NxKx2: np.ndarray, tie_tolerance: float = 0.0) -> np.ndarray:
    """int8 [N, K] votes: +1 where score_0 >= score_1 - tie_tolerance, else -1."""
    scores_NxKx2 = np.asarray(scores_NxKx2, dtype=np.float64)
    if scores_NxKx2.ndim != 3 or scores_NxKx2.shape[-1] != 2:
        raise ValueError(f"scores must have shape [N, K, 2], got {scores_NxKx2.shape}")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    wins_NxK = scores_NxKx2[..., 0] >= scores_NxKx2[..., 1] - tie_tolerance
    return np.where(wins_NxK, 1, -1).astype(np.int8)


def majority(votes_NxK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label_N int8 = sign(sum_k s_k) in {-1, 0, 1}, margin_N int8 = sum_k s_k)."""
    votes_NxK = np.asarray(votes_NxK)
    if votes_NxK.ndim != 2:
        raise ValueError(f"votes must have shape [N, K], got {votes_NxK.shape}")
    margin_N = votes_NxK.astype(np.int64).sum(axis=1)
    return np.sign(margin_N).astype(np.int8), margin_N.astype(np.int8)


def apply_tie_policy(
    label_N: np.ndarray, human_label_N: np.ndarray, policy: str
) -> tuple[np.ndarray, np.ndarray]:
    """Resolve majority ties (label 0). Returns (label_N int8, keep_N bool).

    drop:  tied pairs are not kept.
    human: a tied pair takes the dataset's human label when it is +1 or -1; a pair whose
           human label is also a tie (0) or unknown (NaN) is dropped.
    keep:  tied pairs are kept with label 0 (e.g. for soft vote-share labels).
    """
    if policy not in TIE_POLICIES:
        raise ValueError(f"unknown tie policy {policy!r}; choose one of {TIE_POLICIES}")
    label_N = np.asarray(label_N, dtype=np.int8).copy()
    human_N = np.asarray(human_label_N, dtype=np.float64)
    tied_N = label_N == 0
    if policy == "keep":
        return label_N, np.ones_like(tied_N)
    if policy == "drop":
        return label_N, ~tied_N
    human_decides_N = tied_N & np.isin(human_N, (-1.0, 1.0))
    label_N[human_decides_N] = human_N[human_decides_N].astype(np.int8)
    return label_N, ~tied_N | human_decides_N


def agreement(votes_NxK: np.ndarray, reference_N: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-scorer fraction of pairs whose vote equals the reference label.

    Only pairs with a reference of +1 or -1 count (ties and NaN are skipped). Returns
    (fraction_K float64, NaN when no pair counts; number of pairs counted).
    """
    votes_NxK = np.asarray(votes_NxK)
    reference_N = np.asarray(reference_N, dtype=np.float64)
    counted_N = np.isin(reference_N, (-1.0, 1.0))
    count = int(counted_N.sum())
    if count == 0:
        return np.full(votes_NxK.shape[1], np.nan), 0
    same_NxK = votes_NxK[counted_N] == reference_N[counted_N, None]
    return same_NxK.mean(axis=0), count
