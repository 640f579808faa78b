"""Label modes: which image of a pair wins, decided at train time from the same shards.

Every shard stores each scorer's raw scores [K, 2], its votes s_k [K] (Eq. 6: +1 when
score(x1) >= score(x2) - tie_tolerance), the majority label (Eq. 7 after the tie policy), the
margin sum_k s_k and the human label, so every ablation of the paper is a label mode here (see
MODES). `make_label_fn(mode, ...)` returns a pure, jit-friendly `label_fn(batch, weights_K,
score_std_K, rng)`: the mode is chosen once in Python, nothing branches on traced values, and
the scorer weights (for 'single' the scorer's one-hot, see `label_weights`) are a runtime input.
A label is +1 when image 1 (moments_0) wins, -1 when image 2 wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bdpo_jax.schema import ConfigError

# SmPO's PickScore range mapped to [0, 1] and its label scale (config.label.smpo_*)
SMPO_LO, SMPO_HI, SMPO_SCALE = 0.11544, 0.28202, 10.0

# (batch, weights_K [K], score_std_K [K], rng) -> label; see `make_label_fn`
LabelFn = Callable[[Mapping[str, jax.Array], jax.Array, jax.Array, jax.Array], jax.Array]

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
# modes that read scorer weights (config.label.weights); 'single' reads a one-hot of its scorer
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
        raise ConfigError(
            "config.label.weights: the dataset has no scorers (scorer_names is empty)"
        )
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
            raise ConfigError(
                f"config.label.weights={spec!r}: entry {entry!r} is not 'name=weight'"
            )
        if name not in names:
            raise ConfigError(
                f"config.label.weights={spec!r}: unknown scorer {name!r}; the dataset's scorers "
                f"are {names}"
            )
        if name in seen:
            raise ConfigError(f"config.label.weights={spec!r}: scorer {name!r} is given twice")
        try:
            w = float(value)
        except ValueError:
            raise ConfigError(
                f"config.label.weights={spec!r}: weight {value!r} of {name!r} is not a number"
            ) from None
        if not math.isfinite(w) or w < 0:
            raise ConfigError(
                f"config.label.weights={spec!r}: weight of {name!r} must be finite and >= 0, "
                f"got {w}"
            )
        seen.add(name)
        weights[names.index(name)] = w
    if weights.sum() <= 0:
        raise ConfigError(f"config.label.weights={spec!r}: weights must have a positive sum")
    return weights


def check_label_config(label_config: Any, scorer_names: Sequence[str]) -> None:
    """Validate config.label against the dataset's scorers; raise ConfigError naming the field."""
    mode = label_config.mode
    if mode not in MODES:
        raise ConfigError(
            f"config.label.mode={mode!r} is not a label mode; valid modes: {list(MODES)}"
        )
    names = list(scorer_names)
    if not names and mode not in ("human",):
        raise ConfigError(f"config.label.mode={mode!r} needs scorers, but the dataset has none")
    if mode in SCORER_MODES:
        scorer = label_config.get("scorer", "")
        if scorer not in names:
            raise ConfigError(
                f"config.label.scorer={scorer!r}: label mode {mode!r} needs one of the dataset's "
                f"scorers {names}"
            )
    if mode in WEIGHTED_MODES:
        parse_weights(label_config.get("weights", ""), names)
    if mode == "smpo":
        lo = float(label_config.get("smpo_lo", SMPO_LO))
        hi = float(label_config.get("smpo_hi", SMPO_HI))
        scale = float(label_config.get("smpo_scale", SMPO_SCALE))
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ConfigError(
                f"config.label.smpo_lo={lo}, config.label.smpo_hi={hi}: need finite lo < hi"
            )
        if not math.isfinite(scale):
            raise ConfigError(f"config.label.smpo_scale={scale}: must be finite")


def label_weights(
    mode: str, scorer_names: Sequence[str], scorer: str = "", spec: str = ""
) -> np.ndarray:
    """float32 [K] `weights_K`, the runtime input of every label function.

    'single': the one-hot of `scorer` (the pick is then data, so runs on different scorers share
    one compiled program); WEIGHTED_MODES: `parse_weights(spec)`; other modes do not read it:
    equal weights 1/K.
    """
    names = list(scorer_names)
    if mode == "single":
        if scorer not in names:
            raise ConfigError(f"config.label.scorer={scorer!r}: expected one of {names}")
        onehot_K = np.zeros(len(names), np.float32)
        onehot_K[names.index(scorer)] = 1.0
        return onehot_K
    if mode in WEIGHTED_MODES:
        return parse_weights(spec, names)
    return np.full(len(names), 1.0 / max(len(names), 1), np.float32)


def _vote_sign(x_B: jax.Array) -> jax.Array:
    """+1 where x >= 0 else -1: Eq. 6's convention (an exact tie keeps image 1 as winner)."""
    return jnp.where(x_B >= 0, 1.0, -1.0).astype(jnp.float32)


def _votes_BxK(batch: Mapping[str, jax.Array], names: Sequence[str]) -> jax.Array:
    votes_BxK = jnp.asarray(batch["votes"], jnp.float32)
    if names and len(names) != votes_BxK.shape[1]:
        raise ValueError(
            f"scorer_names {list(names)} do not match the batch's K = {votes_BxK.shape[1]} votes"
        )
    return votes_BxK


def _score_diff_BxK(batch: Mapping[str, jax.Array]) -> jax.Array:
    """r_k(x1) - r_k(x2) on the raw scores [B, K, 2]."""
    scores_BxKx2 = jnp.asarray(batch["scores"], jnp.float32)
    return scores_BxKx2[..., 0] - scores_BxKx2[..., 1]


def make_label_fn(
    mode: str,
    scorer_names: Sequence[str],
    *,
    scorer: str = "",
    smpo_lo: float = SMPO_LO,
    smpo_hi: float = SMPO_HI,
    smpo_scale: float = SMPO_SCALE,
) -> LabelFn:
    """The pure `label_fn(batch, weights_K, score_std_K, rng) -> label` of one label mode.

    batch: scores [B, K, 2] (raw, image 1 and image 2), votes [B, K], label [B] (majority),
    margin [B] (sum_k s_k), human_label [B] (NaN when absent). weights_K: `label_weights` (the
    scorer of 'single' as a one-hot; the weights of 'score_sum' and 'normalized_sum'; for
    'weighted_sum' they go to the loss, not used here). score_std_K: the dataset std of each
    scorer's scores ('normalized_sum'). rng: a key ('random_scorer').
    The label is float32 [B] (mode 'weighted_sum': [B, K]; mode 'sft': int32 [B] winner index,
    0 = image 1, with a majority tie counted as an image-1 win like Eq. 6).
    `scorer` is read by 'smpo' only (a static pick of the reward model's raw scores).
    """
    names = tuple(scorer_names)
    if mode not in MODES:
        raise ConfigError(f"config.label.mode={mode!r} is not a label mode; valid: {list(MODES)}")
    if mode == "smpo" and scorer not in names:
        raise ConfigError(
            f"config.label.scorer={scorer!r}: label mode 'smpo' needs one of {list(names)}"
        )

    def majority(batch, weights_K, score_std_K, rng):
        return jnp.asarray(batch["label"], jnp.float32)

    def human(batch, weights_K, score_std_K, rng):
        human_B = jnp.asarray(batch["human_label"], jnp.float32)
        return jnp.where(jnp.isnan(human_B), 0.0, human_B)

    def sft(batch, weights_K, score_std_K, rng):
        return jnp.where(jnp.asarray(batch["label"]) >= 0, 0, 1).astype(jnp.int32)

    def single(batch, weights_K, score_std_K, rng):  # weights_K: the scorer's one-hot
        return _votes_BxK(batch, names) @ jnp.asarray(weights_K, jnp.float32)

    def weighted_sum(batch, weights_K, score_std_K, rng):
        return _votes_BxK(batch, names)

    def soft_vote(batch, weights_K, score_std_K, rng):
        k = _votes_BxK(batch, names).shape[1]
        return jnp.asarray(batch["margin"], jnp.float32) / k

    def random_scorer(batch, weights_K, score_std_K, rng):
        votes_BxK = _votes_BxK(batch, names)
        pick = jax.random.randint(rng, (), 0, votes_BxK.shape[1])
        return jnp.take(votes_BxK, pick, axis=1)

    def score_sum(batch, weights_K, score_std_K, rng):
        return _vote_sign(_score_diff_BxK(batch) @ jnp.asarray(weights_K, jnp.float32))

    def normalized_sum(batch, weights_K, score_std_K, rng):
        diff_BxK = _score_diff_BxK(batch)
        std_K = jnp.asarray(score_std_K, jnp.float32)
        if std_K.shape != diff_BxK.shape[1:]:
            raise ValueError(
                f"score_std has shape {std_K.shape}, expected [K] = {diff_BxK.shape[1:]}"
            )
        # a scorer with zero spread carries no information: its term is 0
        std_1xK = std_K[None, :]
        z_BxK = jnp.where(std_1xK > 0, diff_BxK / jnp.where(std_1xK > 0, std_1xK, 1.0), 0.0)
        return _vote_sign(z_BxK @ jnp.asarray(weights_K, jnp.float32))

    def smpo(batch, weights_K, score_std_K, rng):
        s_Bx2 = jnp.asarray(batch["scores"], jnp.float32)[:, names.index(scorer)]
        n_Bx2 = (s_Bx2 - smpo_lo) / (smpo_hi - smpo_lo)
        p_B = jax.nn.sigmoid(n_Bx2[:, 0] - n_Bx2[:, 1])
        return (2.0 * p_B - 1.0) * smpo_scale

    return {
        "majority": majority,
        "single": single,
        "human": human,
        "weighted_sum": weighted_sum,
        "score_sum": score_sum,
        "normalized_sum": normalized_sum,
        "random_scorer": random_scorer,
        "soft_vote": soft_vote,
        "smpo": smpo,
        "sft": sft,
    }[mode]
