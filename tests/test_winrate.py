"""Tests of scorers_torch.winrate: a hand-computed worked example with ties, and a naive loop."""

import itertools
import math

import numpy as np
import pytest

from scorers_torch import winrate

# (model, prompt, seed, metric, score). Bests worked out by hand:
#   pick: base p0 .3 p1 .5 p2 .4 p3 .1 | ours p0 .35 p1 .5 p2 .3 p3 .6
#         ours vs base: p0 win, p1 tie, p2 loss, p3 win -> 2 wins, 1 tie, 1 loss
#   aes:  base p0 5 p1 6 p2 3 p3 7     | ours p0 5 p1 5.5 p2 3.5 p3 7
#         ours vs base: p0 tie, p1 loss, p2 win, p3 tie -> 1 win, 2 ties, 1 loss
_SCORES = {
    ("base", "pick"): {"p0": [0.1, 0.3], "p1": [0.5, 0.2], "p2": [0.4, 0.4], "p3": [0.0, 0.1]},
    ("ours", "pick"): {"p0": [0.2, 0.35], "p1": [0.5, 0.1], "p2": [0.3, 0.1], "p3": [0.6, 0.0]},
    ("base", "aes"): {"p0": [4, 5], "p1": [6, 6], "p2": [3, 2], "p3": [7, 1]},
    ("ours", "aes"): {"p0": [5, 5], "p1": [5.5, 1], "p2": [3.5, 0], "p3": [7, 7]},
}


def _columns(scores=_SCORES):
    rows = [
        (model, prompt, seed, metric, value)
        for (model, metric), per_prompt in scores.items()
        for prompt, values in per_prompt.items()
        for seed, value in enumerate(values)
    ]
    model, prompt, seed, metric, value = zip(*rows, strict=True)
    return {"model": model, "prompt_id": prompt, "metric": metric, "score": value}


def _best(columns, **kwargs):
    return winrate.best_of_seeds(
        columns["model"], columns["prompt_id"], columns["metric"], columns["score"], **kwargs
    )


def test_worked_example_with_ties():
    best = _best(_columns())
    assert best.models == ("base", "ours")
    assert best.metrics == ("pick", "aes")
    np.testing.assert_allclose(best.best("pick", "base"), [0.3, 0.5, 0.4, 0.1])
    np.testing.assert_allclose(best.best("aes", "ours"), [5, 5.5, 3.5, 7])
    assert (best.count_KxMxP == 2).all()

    results = {r.metric: r for r in winrate.pairwise_win_rates(best, [("ours", "base")])}
    pick, aes = results["pick"], results["aes"]
    assert (pick.n, pick.wins, pick.ties, pick.losses) == (4, 2, 1, 1)
    assert pick.win_rate == 0.5
    assert pick.tie_rate == 0.25
    assert pick.loss_rate == 0.25
    assert pick.win_rate_half_ties == 0.625
    assert (aes.n, aes.wins, aes.ties, aes.losses) == (4, 1, 2, 1)
    assert aes.win_rate == 0.25
    assert aes.tie_rate == 0.5
    assert aes.win_rate_half_ties == 0.5

    # The reverse direction swaps wins and losses.
    reverse = winrate.pairwise_win_rates(best, [("base", "ours")])[0]
    assert (reverse.wins, reverse.ties, reverse.losses) == (1, 1, 2)


def test_worked_example_tie_tolerance():
    best = _best(_columns())
    pick = winrate.pairwise_win_rates(best, [("ours", "base")], tie_tol=0.06)[0]
    # p0 differs by 0.05 and becomes a tie; p2 (-0.1) stays a loss, p3 (+0.5) a win.
    assert (pick.wins, pick.ties, pick.losses) == (1, 2, 1)


def test_worked_example_means():
    columns = _columns()
    best = _best(columns)
    means = {
        (r.model, r.metric): r
        for r in winrate.mean_scores(columns["model"], columns["metric"], columns["score"], best)
    }
    assert means[("base", "pick")].mean_all == pytest.approx(2.0 / 8)
    assert means[("base", "pick")].mean_best == pytest.approx(1.3 / 4)
    assert means[("ours", "pick")].mean_all == pytest.approx(2.15 / 8)
    assert means[("ours", "pick")].mean_best == pytest.approx(1.75 / 4)
    assert means[("base", "aes")].mean_all == pytest.approx(34 / 8)
    assert means[("ours", "aes")].mean_best == pytest.approx(21 / 4)
    assert means[("ours", "aes")].n_images == 8
    assert means[("ours", "aes")].n_prompts == 4


def test_select_prompts():
    best = _best(_columns()).select_prompts(["p3", "p0"])
    assert best.prompt_ids == ("p3", "p0")
    np.testing.assert_allclose(best.best("pick", "ours"), [0.6, 0.35])
    pick = winrate.pairwise_win_rates(best, [("ours", "base")])[0]
    assert (pick.n, pick.wins, pick.ties, pick.losses) == (2, 2, 0, 0)
    with pytest.raises(ValueError, match="have no scores"):
        _best(_columns()).select_prompts(["p9"])


def test_default_pairs_put_reference_second():
    assert winrate.default_pairs(["base", "ours", "dpo"], "base") == [
        ("ours", "base"),
        ("dpo", "base"),
        ("ours", "dpo"),
    ]
    assert winrate.default_pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    with pytest.raises(ValueError, match="reference model 'sd15'"):
        winrate.default_pairs(["a", "b"], "sd15")


def _naive(rows, model_a, model_b, metric):
    best = {}
    for model, prompt, _, m, value in rows:
        if m == metric:
            key = (model, prompt)
            best[key] = max(best.get(key, -math.inf), value)
    wins = ties = losses = 0
    prompts = sorted({prompt for _, prompt, _, _, _ in rows})
    for prompt in prompts:
        a, b = best[(model_a, prompt)], best[(model_b, prompt)]
        if a > b:
            wins += 1
        elif a == b:
            ties += 1
        else:
            losses += 1
    return wins, ties, losses, len(prompts)


def test_matches_naive_loop_on_random_table():
    rng = np.random.default_rng(0)
    models, metrics = ["base", "ours", "dpo"], ["pick", "hps"]
    prompts = [f"p{i}" for i in range(9)]
    # Scores rounded to one decimal so ties between bests actually occur.
    rows = [
        (model, prompt, seed, metric, float(np.round(rng.uniform(0, 1), 1)))
        for model, prompt, seed, metric in itertools.product(models, prompts, range(5), metrics)
    ]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    model, prompt, _, metric, score = zip(*rows, strict=True)
    best = winrate.best_of_seeds(model, prompt, metric, score, models=models)
    results = winrate.pairwise_win_rates(best, winrate.default_pairs(models, "base"))
    assert len(results) == 3 * 2
    total_ties = 0
    for r in results:
        expected = _naive(rows, r.model_a, r.model_b, r.metric)
        assert (r.wins, r.ties, r.losses, r.n) == expected
        total_ties += r.ties
    assert total_ties > 0  # the example really exercises ties


def test_bad_tables_raise():
    columns = _columns()
    with pytest.raises(ValueError, match="non-finite score"):
        winrate.best_of_seeds(["a"], ["p"], ["m"], [float("nan")])
    with pytest.raises(ValueError, match="seeds scored"):
        winrate.best_of_seeds(["a", "a", "a"], ["p", "p", "q"], ["m", "m", "m"], [1, 2, 3])
    with pytest.raises(ValueError, match="same length"):
        winrate.best_of_seeds(["a"], ["p", "q"], ["m"], [1])
    with pytest.raises(ValueError, match="not listed"):
        _best(columns, models=["base"])
    with pytest.raises(ValueError, match="has no scores"):
        winrate.pairwise_win_rates(_best(columns), [("ours", "dpo")])


def _wilson_by_hand(k, n, z=1.959963984540054):
    """The textbook formula written out once more, independently of the module."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_wilson_interval_hand_worked():
    # 7 of 10: p = 0.7, z^2/n = 0.38415, centre = 0.89207 / 1.38415 = 0.64449,
    # half = 1.41600 * sqrt(0.021 + 0.0096037) = 0.24771 -> (0.3968, 0.8922)
    assert winrate.wilson_interval(7, 10) == pytest.approx((0.39677, 0.89220), abs=1e-5)
    # 0 of 10: centre = half = 0.13877 -> (0, 0.2775): not empty at k = 0, unlike Wald's
    assert winrate.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    # 60 of 100: centre 0.59630, half 0.09430 -> (0.5020, 0.6906), just above one half
    assert winrate.wilson_interval(60, 100) == pytest.approx((0.50200, 0.69060), abs=1e-5)
    for k, n in ((7, 10), (60, 100), (3, 30), (27, 27), (1, 1)):
        low, high = _wilson_by_hand(k, n)
        assert winrate.wilson_interval(k, n) == pytest.approx((max(low, 0), min(high, 1)))
    low, high = winrate.wilson_interval(0, 0)
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        winrate.wilson_interval(5, 4)


def test_verdict_rule_on_decisive_share():
    # the interval of wins / (wins + losses) must exclude one half
    assert winrate.verdict(60, 40) == "win"  # lower bound 0.5020
    assert winrate.verdict(59, 41) == "inconclusive"  # lower bound 0.4920
    assert winrate.verdict(40, 60) == "loss"
    assert winrate.verdict(0, 0) == "inconclusive"  # every prompt tied
    # 27 wins, 73 ties, no loss: the strict win share 27% has its whole interval below one
    # half, yet A never lost a prompt that did not tie: the verdict is a win
    cell = winrate.PairResult("a", "b", "m", n=100, wins=27, ties=73, losses=0)
    assert cell.win_interval == pytest.approx(_wilson_by_hand(27, 100))
    assert cell.win_interval[1] < 0.5
    assert cell.decisive_share == 1.0
    assert cell.decisive_interval[0] == pytest.approx(_wilson_by_hand(27, 27)[0])  # 0.8754
    assert cell.verdict == "win"
    # a model identical to the reference ties everywhere: inconclusive, not a loss
    assert winrate.PairResult("a", "b", "m", 30, 0, 30, 0).verdict == "inconclusive"
    row = cell.as_dict()
    assert row["verdict"] == "win" and row["boot_win_low"] is None
    assert (row["win_low"], row["win_high"]) == cell.win_interval


def test_paired_bootstrap_matches_a_loop_and_is_reproducible():
    outcome_P = np.array([1, 1, 0, -1, 1, 0, 1, -1, 1, 1])
    idx_RxP = winrate.bootstrap_indices(10, 500, seed=3)
    np.testing.assert_array_equal(idx_RxP, winrate.bootstrap_indices(10, 500, seed=3))
    boot = winrate.paired_bootstrap(outcome_P, idx_RxP)
    win_R, share_R = [], []
    for idx in idx_RxP:  # the same resamples, one at a time
        drawn = outcome_P[idx]
        win_R.append(np.mean(drawn == 1))
        if np.any(drawn != 0):
            share_R.append(np.sum(drawn == 1) / np.sum(drawn != 0))
    assert boot.win_low == pytest.approx(np.percentile(win_R, 2.5))
    assert boot.win_high == pytest.approx(np.percentile(win_R, 97.5))
    assert boot.decisive_low == pytest.approx(np.percentile(share_R, 2.5))
    assert boot.num_resamples == 500
    assert winrate.paired_bootstrap(np.ones(5), winrate.bootstrap_indices(5, 50)).win_low == 1.0

    best = _best(_columns())
    a = winrate.pairwise_win_rates(best, [("ours", "base")], bootstrap=200, bootstrap_seed=1)
    b = winrate.pairwise_win_rates(best, [("ours", "base")], bootstrap=200, bootstrap_seed=1)
    assert a == b and a[0].bootstrap.num_resamples == 200
    assert a[0].bootstrap.win_low <= a[0].win_rate <= a[0].bootstrap.win_high


def test_summarize_seeds():
    def cell(wins, ties, losses):
        return winrate.PairResult("ours", "base", "pick", wins + ties + losses, wins, ties, losses)

    seeds = [[cell(70, 0, 30)], [cell(60, 0, 40)], [cell(52, 0, 48)]]
    (summary,) = winrate.summarize_seeds(seeds)
    assert summary.mean_win_rate == pytest.approx((0.7 + 0.6 + 0.52) / 3)
    assert summary.win_range == (0.52, 0.7)
    assert summary.verdicts == ("win", "win", "inconclusive")
    assert summary.verdict_text() == "win 2/3, inconclusive 1/3"
    assert summary.as_dict()["verdicts"] == {"win": 2, "loss": 0, "inconclusive": 1}
    with pytest.raises(ValueError, match="other cells"):
        winrate.summarize_seeds([[cell(1, 0, 0)], []])
