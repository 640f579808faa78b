"""The paper's evaluation protocol (Appendix D) as pure numpy: best-of-seeds, win rates, means.

Input is a long table of scores, one row per (model, prompt_id, seed, metric). For each metric
and prompt, a model's score is the best of its seeds. Model A beats model B on a prompt when
A's best is strictly greater than B's best; equal bests (within `tie_tol`) are ties, reported
separately. `win_rate` counts only strict wins (the paper's rule); `win_rate_half_ties` counts a
tie as half a win (PickScore's evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BestScores:
    """Best-of-seeds scores: `best_KxMxP[k, m, p]` for metric k, model m, prompt p.

    Cells without any score hold NaN and a count of 0; `count_KxMxP` is the number of seeds.
    """

    metrics: tuple[str, ...]
    models: tuple[str, ...]
    prompt_ids: tuple[str, ...]
    best_KxMxP: np.ndarray
    count_KxMxP: np.ndarray

    def best(self, metric: str, model: str) -> np.ndarray:
        """Per-prompt best scores [P] of one model on one metric (NaN where missing)."""
        return self.best_KxMxP[self.metrics.index(metric), self.models.index(model)]

    def select_prompts(self, prompt_ids: Sequence[str]) -> BestScores:
        """The same scores restricted to `prompt_ids` (e.g. one PartiPrompts category)."""
        index = {p: i for i, p in enumerate(self.prompt_ids)}
        missing = [p for p in prompt_ids if p not in index]
        if missing:
            raise ValueError(f"prompts {missing[:5]} have no scores")
        idx_P = np.array([index[p] for p in prompt_ids], dtype=np.int64)
        return BestScores(
            self.metrics,
            self.models,
            tuple(prompt_ids),
            self.best_KxMxP[:, :, idx_P],
            self.count_KxMxP[:, :, idx_P],
        )


@dataclass(frozen=True)
class PairResult:
    """Outcome of model_a vs model_b on one metric over the prompts both have scores for."""

    model_a: str
    model_b: str
    metric: str
    n: int
    wins: int
    ties: int
    losses: int

    def _rate(self, count: float) -> float:
        return count / self.n if self.n else float("nan")

    @property
    def win_rate(self) -> float:
        """Share of prompts where A's best > B's best (strictly)."""
        return self._rate(self.wins)

    @property
    def tie_rate(self) -> float:
        return self._rate(self.ties)

    @property
    def loss_rate(self) -> float:
        return self._rate(self.losses)

    @property
    def win_rate_half_ties(self) -> float:
        """(wins + 0.5 ties) / n, as PickScore's evaluation counts ties."""
        return self._rate(self.wins + 0.5 * self.ties)

    def as_dict(self) -> dict[str, object]:
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "metric": self.metric,
            "n_prompts": self.n,
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "win_rate": self.win_rate,
            "tie_rate": self.tie_rate,
            "loss_rate": self.loss_rate,
            "win_rate_half_ties": self.win_rate_half_ties,
        }


@dataclass(frozen=True)
class MeanResult:
    """Mean score of one model on one metric: over all images, and over per-prompt bests."""

    model: str
    metric: str
    n_images: int
    mean_all: float
    n_prompts: int
    mean_best: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _ordered_unique(values: np.ndarray, order: Sequence[str] | None, what: str) -> list[str]:
    present = list(dict.fromkeys(values.tolist()))  # first-appearance order
    if order is None:
        return present
    missing = sorted(set(present) - set(order))
    if missing:
        raise ValueError(f"scores table has {what} {missing} not listed in the given order")
    return list(order)


def best_of_seeds(
    model: Sequence[str],
    prompt_id: Sequence[str],
    metric: Sequence[str],
    score: Sequence[float],
    *,
    models: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    require_equal_counts: bool = True,
) -> BestScores:
    """Best score over seeds per (metric, model, prompt) from the columns of a long table.

    `models`/`metrics` fix the order of the axes (default: first appearance). With
    `require_equal_counts`, a cell scored on fewer seeds than the others raises an error
    naming it, since best-of-N is only comparable for equal N.
    """
    model_N = np.asarray(model, dtype=object)
    prompt_N = np.asarray(prompt_id, dtype=object)
    metric_N = np.asarray(metric, dtype=object)
    score_N = np.asarray(score, dtype=np.float64)
    if not (len(model_N) == len(prompt_N) == len(metric_N) == len(score_N)):
        raise ValueError("model, prompt_id, metric and score columns must have the same length")
    if not np.all(np.isfinite(score_N)):
        bad = int(np.flatnonzero(~np.isfinite(score_N))[0])
        raise ValueError(
            f"non-finite score {score_N[bad]} for model {model_N[bad]!r}, "
            f"prompt {prompt_N[bad]!r}, metric {metric_N[bad]!r}"
        )
    model_names = _ordered_unique(model_N, models, "models")
    metric_names = _ordered_unique(metric_N, metrics, "metrics")
    prompt_names = list(dict.fromkeys(prompt_N.tolist()))
    model_idx = {name: i for i, name in enumerate(model_names)}
    metric_idx = {name: i for i, name in enumerate(metric_names)}
    prompt_idx = {name: i for i, name in enumerate(prompt_names)}
    m_N = np.array([model_idx[v] for v in model_N], dtype=np.int64)
    k_N = np.array([metric_idx[v] for v in metric_N], dtype=np.int64)
    p_N = np.array([prompt_idx[v] for v in prompt_N], dtype=np.int64)

    shape = (len(metric_names), len(model_names), len(prompt_names))
    best_KxMxP = np.full(shape, -np.inf)
    count_KxMxP = np.zeros(shape, dtype=np.int64)
    np.maximum.at(best_KxMxP, (k_N, m_N, p_N), score_N)
    np.add.at(count_KxMxP, (k_N, m_N, p_N), 1)
    best_KxMxP[count_KxMxP == 0] = np.nan

    if require_equal_counts and count_KxMxP.size:
        present = count_KxMxP[count_KxMxP > 0]
        if present.size and present.min() != present.max():
            k, m, p = np.argwhere((count_KxMxP > 0) & (count_KxMxP != present.max()))[0]
            raise ValueError(
                f"model {model_names[m]!r}, prompt {prompt_names[p]!r}, metric "
                f"{metric_names[k]!r} has {count_KxMxP[k, m, p]} seeds scored, others have "
                f"{present.max()}: best-of-N needs the same N everywhere"
            )
    return BestScores(
        metrics=tuple(metric_names),
        models=tuple(model_names),
        prompt_ids=tuple(prompt_names),
        best_KxMxP=best_KxMxP,
        count_KxMxP=count_KxMxP,
    )


def compare_bests(
    best_a_P: np.ndarray, best_b_P: np.ndarray, tie_tol: float = 0.0
) -> tuple[int, int, int, int]:
    """(wins, ties, losses, n) of A vs B over prompts where both are finite.

    A tie is |a - b| <= tie_tol; otherwise a > b is a win (strict) and a < b a loss.
    """
    best_a_P = np.asarray(best_a_P, dtype=np.float64)
    best_b_P = np.asarray(best_b_P, dtype=np.float64)
    both_P = np.isfinite(best_a_P) & np.isfinite(best_b_P)
    a_P, b_P = best_a_P[both_P], best_b_P[both_P]
    tie_P = np.abs(a_P - b_P) <= tie_tol
    wins = int(np.sum((a_P > b_P) & ~tie_P))
    ties = int(np.sum(tie_P))
    losses = int(np.sum((a_P < b_P) & ~tie_P))
    return wins, ties, losses, int(both_P.sum())


def default_pairs(models: Sequence[str], reference: str | None = None) -> list[tuple[str, str]]:
    """Every unordered pair once, as the paper's tables list them.

    With a reference: "X vs reference" for each other model first, then the remaining pairs in
    model order ("A vs B" with A listed first).
    """
    models = list(models)
    if reference is not None and reference not in models:
        raise ValueError(f"reference model {reference!r} is not one of the models {models}")
    others = [m for m in models if m != reference]
    pairs = [(m, reference) for m in others] if reference is not None else []
    pairs += [(a, b) for i, a in enumerate(others) for b in others[i + 1 :]]
    return pairs


def pairwise_win_rates(
    best: BestScores,
    pairs: Sequence[tuple[str, str]] | None = None,
    tie_tol: float = 0.0,
) -> list[PairResult]:
    """Win/tie/loss of every pair (default: `default_pairs(best.models)`) on every metric."""
    pairs = default_pairs(best.models) if pairs is None else list(pairs)
    results = []
    for model_a, model_b in pairs:
        for name in (model_a, model_b):
            if name not in best.models:
                raise ValueError(f"model {name!r} has no scores; scored models: {best.models}")
        for metric in best.metrics:
            wins, ties, losses, n = compare_bests(
                best.best(metric, model_a), best.best(metric, model_b), tie_tol
            )
            results.append(PairResult(model_a, model_b, metric, n, wins, ties, losses))
    return results


def mean_scores(
    model: Sequence[str], metric: Sequence[str], score: Sequence[float], best: BestScores
) -> list[MeanResult]:
    """Mean over all images and mean of per-prompt bests, per model and metric (Table 6)."""
    model_N = np.asarray(model, dtype=object)
    metric_N = np.asarray(metric, dtype=object)
    score_N = np.asarray(score, dtype=np.float64)
    results = []
    for m, model_name in enumerate(best.models):
        for k, metric_name in enumerate(best.metrics):
            rows_N = (model_N == model_name) & (metric_N == metric_name)
            best_P = best.best_KxMxP[k, m]
            best_P = best_P[np.isfinite(best_P)]
            results.append(
                MeanResult(
                    model=model_name,
                    metric=metric_name,
                    n_images=int(rows_N.sum()),
                    mean_all=float(score_N[rows_N].mean()) if rows_N.any() else float("nan"),
                    n_prompts=int(best_P.size),
                    mean_best=float(best_P.mean()) if best_P.size else float("nan"),
                )
            )
    return results
