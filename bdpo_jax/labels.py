"""Label modes: which image of a pair wins, decided at train time from the same shards.

Every shard stores each scorer's raw scores [K, 2], its votes s_k [K] (Eq. 6: +1 when
score(x1) >= score(x2) - tie_tolerance), the majority label (Eq. 7 after the tie policy), the
margin sum_k s_k and the human label, so every ablation of the paper is a label mode here (see
MODES). Pure jnp and jit-friendly: `mode` and `scorer` are static Python values; nothing
branches on traced values. A label is +1 when image 1 (moments_0) wins, -1 when image 2 wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# mode -> what it computes (the paper's name in brackets); README table source
MODES: dict[str, str] = {
    "majority": "stored majority label sign(sum_k s_k) [BalancedDPO, Eq. 7]",
    "single": "votes of the scorer config.label.scorer [single-metric ablation]",
    "human": "the dataset's human label, NaN -> 0 [Diffusion-DPO / no multi-metric]",
    "weighted_sum": "per-scorer votes [B, K]; loss sum_k w_k loss_k [Eq. 10, vanilla aggregation]",
    "score_sum": "sign(sum_k w_k (r_k(x1) - r_k(x2))) on raw scores [naive scalarisation]",
    "normalized_sum": "sign(sum_k w_k (r_k(x1) - r_k(x2)) / std_k) [normalised aggregation]",
    "random_scorer": "votes of one scorer drawn uniformly per step [Random Score Function]",
    "soft_vote": "vote share margin / K in [-1, 1] [SmPO-style smoothed label]",
    "smpo": "(2 sigmoid(n(x1) - n(x2)) - 1) * scale, n = (s - lo) / (hi - lo) [SmPO]",
    "sft": "index of the majority winner (0 or 1) for plain SFT on winners [SFT baseline]",
}
# modes that read scorer weights (config.label.weights)
WEIGHTED_MODES = ("weighted_sum", "score_sum", "normalized_sum")
# modes that need config.label.scorer
SCORER_MODES = ("single", "smpo")


def parse_weights(spec: str, scorer_names: Sequence[str]) -> np.ndarray:
    """float32 [K] weights from config.label.weights 'name=w,name=w'.

    '' gives equal weights 1/K. Otherwise weights are used exactly as given (no
    normalisation); scorers not named get weight 0. Weights must be finite and >= 0 with a
    positive sum.
    """
    names = list(scorer_names)
    if not names:
        raise ValueError("config.label.weights: the dataset has no scorers (scorer_names is empty)")
    if not spec.strip():
        return np.full(len(names), 1.0 / len(names), np.float32)
    weights = np.zeros(len(names), np.float32)
    seen: set[str] = set()
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"config.label.weights={spec!r}: entry {entry!r} is not 'name=weight'")
        if name not in names:
            raise ValueError(
                f"config.label.weights={spec!r}: unknown scorer {name!r}; the dataset's scorers "
                f"are {names}"
            )
        if name in seen:
            raise ValueError(f"config.label.weights={spec!r}: scorer {name!r} is given twice")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(
                f"config.label.weights={spec!r}: weight {value!r} of {name!r} is not a number"
            ) from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(
                f"config.label.weights={spec!r}: weight of {name!r} must be finite and >= 0, "
                f"got {w}"
            )
        seen.add(name)
        weights[names.index(name)] = w
    if weights.sum() <= 0:
        raise ValueError(f"config.label.weights={spec!r}: weights must have a positive sum")
    return weights


def check_label_config(label_config: Any, scorer_names: Sequence[str]) -> None:
    """Validate config.label against the dataset's scorers; raise ValueError naming the field."""
    mode = label_config.mode
    if mode not in MODES:
        raise ValueError(
            f"config.label.mode={mode!r} is not a label mode; valid modes: {list(MODES)}"
        )
    names = list(scorer_names)
    if not names and mode not in ("human",):
        raise ValueError(f"config.label.mode={mode!r} needs scorers, but the dataset has none")
    if mode in SCORER_MODES:
        scorer = label_config.get("scorer", "")
        if scorer not in names:
            raise ValueError(
                f"config.label.scorer={scorer!r}: label mode {mode!r} needs one of the dataset's "
                f"scorers {names}"
            )
    if mode in WEIGHTED_MODES:
        parse_weights(label_config.get("weights", ""), names)
    if mode == "smpo":
        lo = float(label_config.get("smpo_lo", 0.11544))
        hi = float(label_config.get("smpo_hi", 0.28202))
        scale = float(label_config.get("smpo_scale", 10.0))
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(
                f"config.label.smpo_lo={lo}, config.label.smpo_hi={hi}: need finite lo < hi"
            )
        if not math.isfinite(scale):
            raise ValueError(f"config.label.smpo_scale={scale}: must be finite")


def _weights_or_equal(weights: Any, k: int) -> jax.Array:
    if weights is None:
        return jnp.full((k,), 1.0 / k, jnp.float32)
    w_K = jnp.asarray(weights, jnp.float32)
    if w_K.shape != (k,):
        raise ValueError(f"label weights have shape {w_K.shape}, expected [K] = ({k},)")
    return w_K


def _vote_sign(x_B: jax.Array) -> jax.Array:
    """+1 where x >= 0 else -1: Eq. 6's convention (an exact tie keeps image 1 as winner)."""
    return jnp.where(x_B >= 0, 1.0, -1.0).astype(jnp.float32)


def scorer_onehot(scorer_names: Sequence[str], scorer: str) -> np.ndarray:
    """float32 [K] one-hot of `scorer` among `scorer_names` (label_for_batch's scorer_onehot)."""
    names = list(scorer_names)
    if scorer not in names:
        raise ValueError(f"config.label.scorer={scorer!r}: expected one of {names}")
    onehot_K = np.zeros(len(names), np.float32)
    onehot_K[names.index(scorer)] = 1.0
    return onehot_K


def label_for_batch(
    mode: str,
    batch: Mapping[str, Any],
    *,
    scorer_names: Sequence[str] = (),
    scorer: str = "",
    weights: Any = None,
    score_std: Any = None,
    rng: jax.Array | None = None,
    scorer_onehot: Any = None,
    smpo_lo: float = 0.11544,
    smpo_hi: float = 0.28202,
    smpo_scale: float = 10.0,
) -> jax.Array:
    """The label the loss takes for one batch.

    batch: scores [B, K, 2] (raw, image 1 and image 2), votes [B, K], label [B] (majority),
    margin [B] (sum_k s_k), human_label [B] (NaN when absent).
    Returns float32 [B] (mode 'weighted_sum': [B, K]; mode 'sft': int32 [B] winner index,
    0 = image 1, with a majority tie counted as an image-1 win like Eq. 6).
    weights: [K] for 'weighted_sum' (goes to the loss, not used here), 'score_sum',
    'normalized_sum'; None = equal 1/K. score_std: [K] dataset std of each scorer's scores
    ('normalized_sum'). rng: a key ('random_scorer'). scorer_onehot: [K] one-hot of `scorer`
    (see `scorer_onehot`) for 'single': the pick is then a runtime input, so runs on
    different scorers share one compiled program; without it the pick is a static index.
    """
    names = list(scorer_names)
    if mode == "majority":
        return jnp.asarray(batch["label"], jnp.float32)
    if mode == "human":
        human_B = jnp.asarray(batch["human_label"], jnp.float32)
        return jnp.where(jnp.isnan(human_B), 0.0, human_B)
    if mode == "sft":
        return jnp.where(jnp.asarray(batch["label"]) >= 0, 0, 1).astype(jnp.int32)
    if mode not in MODES:
        raise ValueError(f"config.label.mode={mode!r} is not a label mode; valid: {list(MODES)}")

    votes_BxK = jnp.asarray(batch["votes"], jnp.float32)
    k = votes_BxK.shape[1]
    if names and len(names) != k:
        raise ValueError(f"scorer_names {names} do not match the batch's K = {k} votes")
    if mode in SCORER_MODES and scorer not in names:
        raise ValueError(
            f"config.label.scorer={scorer!r}: label mode {mode!r} needs one of {names}"
        )
    if mode == "single":
        if scorer_onehot is not None:
            return votes_BxK @ jnp.asarray(scorer_onehot, jnp.float32)
        return votes_BxK[:, names.index(scorer)]
    if mode == "weighted_sum":
        return votes_BxK
    if mode == "soft_vote":
        return jnp.asarray(batch["margin"], jnp.float32) / k
    if mode == "random_scorer":
        if rng is None:
            raise ValueError("label mode 'random_scorer' needs an rng key")
        pick = jax.random.randint(rng, (), 0, k)
        return jnp.take(votes_BxK, pick, axis=1)

    scores_BxKx2 = jnp.asarray(batch["scores"], jnp.float32)
    diff_BxK = scores_BxKx2[..., 0] - scores_BxKx2[..., 1]
    if mode == "score_sum":
        return _vote_sign(diff_BxK @ _weights_or_equal(weights, k))
    if mode == "normalized_sum":
        if score_std is None:
            raise ValueError("label mode 'normalized_sum' needs score_std [K] (dataset stats)")
        std_K = jnp.asarray(score_std, jnp.float32)
        if std_K.shape != (k,):
            raise ValueError(f"score_std has shape {std_K.shape}, expected [K] = ({k},)")
        # a scorer with zero spread carries no information: its term is 0
        z_BxK = jnp.where(std_K > 0, diff_BxK / jnp.where(std_K > 0, std_K, 1.0), 0.0)
        return _vote_sign(z_BxK @ _weights_or_equal(weights, k))
    if mode == "smpo":
        s_Bx2 = scores_BxKx2[:, names.index(scorer)]
        n_Bx2 = (s_Bx2 - smpo_lo) / (smpo_hi - smpo_lo)
        p_B = jax.nn.sigmoid(n_Bx2[:, 0] - n_Bx2[:, 1])
        return (2.0 * p_B - 1.0) * smpo_scale
    raise AssertionError(f"unhandled label mode {mode!r}")  # every MODES entry is handled above
