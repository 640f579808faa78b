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
