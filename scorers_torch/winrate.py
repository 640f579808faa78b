"""The paper's evaluation protocol (Appendix D) as pure numpy: best-of-seeds, win rates, means.

Input is a long table of scores, one row per (model, prompt_id, seed, metric). For each metric
and prompt, a model's score is the best of its seeds. Model A beats model B on a prompt when
A's best is strictly greater than B's best; equal bests (within `tie_tol`) are ties, reported
separately. `win_rate` counts only strict wins (the paper's rule); `win_rate_half_ties` counts a
tie as half a win (PickScore's evaluation).

Uncertainty and the verdict rule (one rule for every table of this project):

- interval: the 95% Wilson score interval of the strict win share wins / n, n = the number
  of prompts (ties count as non-wins, as in the paper's win rate);
- verdict: the same Wilson interval on the decisive share wins / (wins + losses), ties
  excluded (a sign test): "win" when its lower bound is > 0.5, "loss" when its upper bound is
  < 0.5, else "inconclusive" (also when every prompt ties). Ties are left out of the verdict
  because a model identical to the reference ties on every prompt: with ties counted as
  non-wins it would read as a "loss"; without ties the two shares and intervals coincide.
- optionally, a paired bootstrap over prompts (`paired_bootstrap`: resample the prompts with
  replacement, A's and B's bests stay together) gives percentile intervals of both shares.

Every cell is its own 95% test: among 32 cells of one table about 1.6 verdicts are expected
to be wrong by chance alone, which is why the demo repeats its training over seeds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal: two-sided 95% intervals
VERDICTS = ("win", "loss", "inconclusive")


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial share k / n; (nan, nan) when n = 0.

    centre = (p + z^2 / 2n) / (1 + z^2 / n), half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n +
    z^2 / 4n^2), p = k / n. Unlike p +- z sqrt(p (1 - p) / n) it stays inside [0, 1] and is
    not empty at k = 0 or k = n.
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = k / n, z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * np.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    # the interval holds p; the clamps only absorb rounding (k = n gives 1 - 1e-16)
    return max(0.0, min(p, float(centre - half))), min(1.0, max(p, float(centre + half)))


def verdict(wins: int, losses: int, z: float = Z95) -> str:
    """'win' / 'loss' / 'inconclusive': is 0.5 outside the Wilson interval of wins / (wins +
    losses)? Ties do not enter (see the module docstring); no decisive prompt: inconclusive."""
    low, high = wilson_interval(wins, wins + losses, z)
    if low > 0.5:
        return "win"
    if high < 0.5:
        return "loss"
    return "inconclusive"


@dataclass(frozen=True)
class BootstrapInterval:
    """Percentile intervals of the strict win share and the decisive share over resamples."""

    win_low: float
    win_high: float
    decisive_low: float
    decisive_high: float
    num_resamples: int


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
    bootstrap: BootstrapInterval | None = None

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

    @property
    def win_interval(self) -> tuple[float, float]:
        """95% Wilson interval of `win_rate` (n = all prompts, ties count as non-wins)."""
        return wilson_interval(self.wins, self.n)

    @property
    def decisive_share(self) -> float:
        """wins / (wins + losses): the share won among prompts that did not tie."""
        decisive = self.wins + self.losses
        return self.wins / decisive if decisive else float("nan")

    @property
    def decisive_interval(self) -> tuple[float, float]:
        """95% Wilson interval of `decisive_share` (the verdict's interval)."""
        return wilson_interval(self.wins, self.wins + self.losses)

    @property
    def verdict(self) -> str:
        return verdict(self.wins, self.losses)

    def as_dict(self) -> dict[str, object]:
        boot = self.bootstrap
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
            "win_low": self.win_interval[0],
            "win_high": self.win_interval[1],
            "decisive_share": self.decisive_share,
            "decisive_low": self.decisive_interval[0],
            "decisive_high": self.decisive_interval[1],
            "verdict": self.verdict,
            "boot_win_low": boot.win_low if boot else None,
            "boot_win_high": boot.win_high if boot else None,
            "boot_decisive_low": boot.decisive_low if boot else None,
            "boot_decisive_high": boot.decisive_high if boot else None,
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


def outcomes(best_a_P: np.ndarray, best_b_P: np.ndarray, tie_tol: float = 0.0) -> np.ndarray:
    """Per-prompt outcome of A vs B over prompts where both are finite: +1 win, 0 tie, -1 loss.

    A tie is |a - b| <= tie_tol; otherwise a > b is a win (strict) and a < b a loss.
    """
    best_a_P = np.asarray(best_a_P, dtype=np.float64)
    best_b_P = np.asarray(best_b_P, dtype=np.float64)
    both_P = np.isfinite(best_a_P) & np.isfinite(best_b_P)
    a_P, b_P = best_a_P[both_P], best_b_P[both_P]
    tie_P = np.abs(a_P - b_P) <= tie_tol
    return np.where(tie_P, 0, np.sign(a_P - b_P)).astype(np.int64)


def compare_bests(
    best_a_P: np.ndarray, best_b_P: np.ndarray, tie_tol: float = 0.0
) -> tuple[int, int, int, int]:
    """(wins, ties, losses, n) of A vs B over prompts where both are finite (see `outcomes`)."""
    outcome_P = outcomes(best_a_P, best_b_P, tie_tol)
    wins, ties = int(np.sum(outcome_P > 0)), int(np.sum(outcome_P == 0))
    return wins, ties, int(np.sum(outcome_P < 0)), int(outcome_P.size)


def bootstrap_indices(num_prompts: int, num_resamples: int, seed: int = 0) -> np.ndarray:
    """[R, P] prompt indices drawn with replacement (numpy's PCG64 with `seed`: reproducible)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_prompts, size=(num_resamples, num_prompts))


def paired_bootstrap(
    outcome_P: np.ndarray, idx_RxP: np.ndarray, confidence: float = 0.95
) -> BootstrapInterval:
    """Percentile intervals of wins / n and wins / (wins + losses) over prompt resamples.

    "Paired": a resample draws whole prompts, so A's and B's bests on a prompt stay together
    (the outcome vector is resampled). Resamples without a decisive prompt are left out of
    the decisive share's percentiles.
    """
    outcome_P = np.asarray(outcome_P)
    if outcome_P.size == 0:
        nan = float("nan")
        return BootstrapInterval(nan, nan, nan, nan, 0)
    drawn_RxP = outcome_P[idx_RxP]
    wins_R = (drawn_RxP > 0).sum(axis=1)
    decisive_R = (drawn_RxP != 0).sum(axis=1)
    tail = 100 * (1 - confidence) / 2
    win_low, win_high = np.percentile(wins_R / outcome_P.size, [tail, 100 - tail])
    share_R = wins_R[decisive_R > 0] / decisive_R[decisive_R > 0]
    dec_low, dec_high = (
        np.percentile(share_R, [tail, 100 - tail]) if share_R.size else (np.nan, np.nan)
    )
    return BootstrapInterval(
        float(win_low), float(win_high), float(dec_low), float(dec_high), len(idx_RxP)
    )


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
    *,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> list[PairResult]:
    """Win/tie/loss of every pair (default: `default_pairs(best.models)`) on every metric.

    `bootstrap` > 0 adds a paired bootstrap over prompts with that many resamples; every cell
    uses the same resampled prompt sets (drawn once with `bootstrap_seed`).
    """
    pairs = default_pairs(best.models) if pairs is None else list(pairs)
    results = []
    for model_a, model_b in pairs:
        for name in (model_a, model_b):
            if name not in best.models:
                raise ValueError(f"model {name!r} has no scores; scored models: {best.models}")
        for metric in best.metrics:
            outcome_P = outcomes(best.best(metric, model_a), best.best(metric, model_b), tie_tol)
            wins, ties = int(np.sum(outcome_P > 0)), int(np.sum(outcome_P == 0))
            losses = int(np.sum(outcome_P < 0))
            boot = None
            if bootstrap > 0:
                idx_RxP = bootstrap_indices(outcome_P.size, bootstrap, bootstrap_seed)
                boot = paired_bootstrap(outcome_P, idx_RxP)
            results.append(
                PairResult(model_a, model_b, metric, outcome_P.size, wins, ties, losses, boot)
            )
    return results


@dataclass(frozen=True)
class SeedSummary:
    """One cell (A vs B on a metric) over several training seeds."""

    model_a: str
    model_b: str
    metric: str
    win_rates: tuple[float, ...]
    verdicts: tuple[str, ...]

    @property
    def mean_win_rate(self) -> float:
        return float(np.mean(self.win_rates))

    @property
    def win_range(self) -> tuple[float, float]:
        return float(np.min(self.win_rates)), float(np.max(self.win_rates))

    @property
    def verdict_counts(self) -> dict[str, int]:
        """{'win': 3, 'loss': 0, 'inconclusive': 0}: every verdict, in `VERDICTS` order."""
        counts = Counter(self.verdicts)
        return {v: counts[v] for v in VERDICTS}

    def verdict_text(self) -> str:
        """'win 3/3', or 'win 2/3, inconclusive 1/3' (the verdicts that occur)."""
        n = len(self.verdicts)
        return ", ".join(f"{v} {c}/{n}" for v, c in self.verdict_counts.items() if c)

    def as_dict(self) -> dict[str, object]:
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "metric": self.metric,
            "seeds": len(self.win_rates),
            "mean_win_rate": self.mean_win_rate,
            "min_win_rate": self.win_range[0],
            "max_win_rate": self.win_range[1],
            "verdicts": self.verdict_counts,
            "verdict_text": self.verdict_text(),
        }


def summarize_seeds(per_seed: Sequence[Sequence[PairResult]]) -> list[SeedSummary]:
    """Cells of the same (A, B, metric) across seeds' results: mean, range, verdict count.

    Every seed must hold the same cells (in any order); the output follows the first seed's.
    """
    if not per_seed:
        return []
    keys = [(r.model_a, r.model_b, r.metric) for r in per_seed[0]]
    by_seed = [{(r.model_a, r.model_b, r.metric): r for r in results} for results in per_seed]
    for i, cells in enumerate(by_seed):
        if set(cells) != set(keys):
            raise ValueError(
                f"seed {i} has other cells than seed 0: {sorted(set(cells) ^ set(keys))}"
            )
    return [
        SeedSummary(
            *key,
            win_rates=tuple(cells[key].win_rate for cells in by_seed),
            verdicts=tuple(cells[key].verdict for cells in by_seed),
        )
        for key in keys
    ]


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
