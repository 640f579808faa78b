"""bdpo_jax.schedules.timestep_probabilities / sample_timesteps against a Monte Carlo of EDM's
noise distribution written out in numpy."""

import jax
import numpy as np
import pytest

from bdpo_jax import schedules

# DDPM's linear schedule (the demo's), written out independently of bdpo_jax.schedules
BETAS_T = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
ABAR_T = np.cumprod(1.0 - BETAS_T)
SCHEDULE = schedules.make_schedule(1000, "linear", 1e-4, 0.02)


def _monte_carlo(mean: float, std: float, draws: int, seed: int = 0) -> np.ndarray:
    """Timesteps of `draws` EDM noise levels ln sigma ~ N(mean, std^2), each taken to the
    timestep whose sigma_t = sqrt((1 - abar) / abar) is nearest in ln sigma (brute force)."""
    log_sigma_T = 0.5 * np.log((1.0 - ABAR_T) / ABAR_T)
    x = np.random.default_rng(seed).normal(mean, std, draws)
    return np.concatenate(
        [np.abs(chunk[:, None] - log_sigma_T[None]).argmin(1) for chunk in np.split(x, 50)]
    )


def test_uniform_is_one_over_t():
    p = schedules.timestep_probabilities(SCHEDULE, "uniform")
    np.testing.assert_array_equal(p, np.full(1000, 1e-3))


@pytest.mark.parametrize("mean,std", [(-1.2, 1.2), (0.5, 0.6)])
def test_lognormal_sigma_matches_a_monte_carlo_of_edm_noise_levels(mean, std):
    p = schedules.timestep_probabilities(
        SCHEDULE, "lognormal_sigma", log_sigma_mean=mean, log_sigma_std=std
    )
    assert p.shape == (1000,) and p.min() >= 0 and p.sum() == pytest.approx(1.0, abs=1e-12)
    draws = 200_000
    t = _monte_carlo(mean, std, draws)
    # 20 bins of 50 timesteps, and each of the first 20 timesteps alone (their cells are wide
    # in ln sigma: where the cell edges lie shows there)
    for counts, want in (
        (np.bincount(t // 50, minlength=20), p.reshape(20, 50).sum(1) * draws),
        (np.bincount(t, minlength=1000)[:20], p[:20] * draws),
    ):
        # binomial: |count - expected| < 5 standard deviations (+1 for empty bins)
        assert np.all(np.abs(counts - want) < 5 * np.sqrt(want * (1 - want / draws)) + 1), (
            counts,
            want.round(),
        )


def test_edm_default_puts_most_weight_on_the_low_noise_timesteps():
    # worked figures for the demo's schedule: sigma_t < 1 (t < 259) holds P(ln sigma < 0) =
    # Phi(1.2 / 1.2) = 0.841 of EDM's draws; sigma_t > 3.4 (t > 500) about 2%
    p = schedules.timestep_probabilities(SCHEDULE, "lognormal_sigma")
    sigma_T = np.sqrt((1.0 - ABAR_T) / ABAR_T)
    assert p[sigma_T < 1.0].sum() == pytest.approx(0.8413, abs=0.003)
    assert p[500:].sum() == pytest.approx(0.02, abs=0.005)


def test_uniform_share_mixes_linearly():
    edm = schedules.timestep_probabilities(SCHEDULE, "lognormal_sigma")
    mixed = schedules.timestep_probabilities(SCHEDULE, "lognormal_sigma", uniform_share=0.5)
    np.testing.assert_allclose(mixed, 0.5 * edm + 0.5e-3, rtol=1e-12)
    whole = schedules.timestep_probabilities(SCHEDULE, "lognormal_sigma", uniform_share=1.0)
    np.testing.assert_allclose(whole, np.full(1000, 1e-3), rtol=1e-12)


def test_sample_timesteps_follows_the_probabilities():
    p = schedules.timestep_probabilities(SCHEDULE, "lognormal_sigma", uniform_share=0.5)
    t = np.asarray(schedules.sample_timesteps(jax.random.key(0), 100_000, 1000, p))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
    counts = np.bincount(t // 50, minlength=20)
    want = p.reshape(20, 50).sum(1) * t.size
    assert np.all(np.abs(counts - want) < 5 * np.sqrt(want) + 1), (counts, want.round())
    again = schedules.sample_timesteps(jax.random.key(0), 100_000, 1000, p)
    np.testing.assert_array_equal(t, np.asarray(again))
    # timesteps without probability never occur
    only = np.zeros(1000)
    only[[3, 700]] = [0.25, 0.75]
    t = np.asarray(schedules.sample_timesteps(jax.random.key(1), 4000, 1000, only))
    assert set(t.tolist()) == {3, 700} and abs(np.mean(t == 700) - 0.75) < 0.03


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="timestep_sampling='logit'"):
        schedules.timestep_probabilities(SCHEDULE, "logit")
    with pytest.raises(ValueError, match="timestep_log_sigma_std=0"):
        schedules.timestep_probabilities(SCHEDULE, "lognormal_sigma", log_sigma_std=0)
    with pytest.raises(ValueError, match="timestep_uniform_share=1.5"):
        schedules.timestep_probabilities(SCHEDULE, "lognormal_sigma", uniform_share=1.5)
    with pytest.raises(ValueError, match="3 probabilities for 1000 steps"):
        schedules.sample_timesteps(jax.random.key(0), 4, 1000, np.ones(3) / 3)
