"""bdpo_jax.schedules against diffusers' DDPMScheduler on the same inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdpo_jax import schedules

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULES = [
    ("scaled_linear", 0.00085, 0.012),  # SD1.x, SD2.x, SDXL
    ("linear", 0.00085, 0.012),
    ("linear", 0.0001, 0.02),  # original DDPM
]


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _diffusers(beta_schedule, beta_start, beta_end, num_train_timesteps=1000):
    return diffusers.DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
    )


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999], np.int64)
    return x0, eps, t


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_schedule_matches_diffusers(beta_schedule, beta_start, beta_end):
    ours = schedules.make_schedule(1000, beta_schedule, beta_start, beta_end)
    ref = _diffusers(beta_schedule, beta_start, beta_end)
    for name, mine, theirs in [
        ("betas", ours.betas_T, ref.betas),
        ("alphas_cumprod", ours.alphas_cumprod_T, ref.alphas_cumprod),
    ]:
        mine, theirs = np.asarray(mine), theirs.numpy()
        assert mine.dtype == np.float32 and mine.shape == (1000,), name
        rel = np.max(np.abs(mine.astype(np.float64) - theirs) / np.abs(theirs))
        assert rel <= 1e-6, (name, rel)
    np.testing.assert_allclose(
        np.asarray(ours.sqrt_one_minus_alphas_cumprod_T) ** 2 + np.asarray(ours.alphas_cumprod_T),
        1.0,
        rtol=1e-6,
    )
    assert ours.num_train_timesteps == 1000


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(inputs, beta_schedule, beta_start, beta_end):
    x0, eps, t = inputs
    ours = schedules.make_schedule(1000, beta_schedule, beta_start, beta_end)
    ref = _diffusers(beta_schedule, beta_start, beta_end)
    tx0, teps, tt = torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)
    xt_ref = ref.add_noise(tx0, teps, tt).numpy()
    v_ref = ref.get_velocity(tx0, teps, tt).numpy()
    t_B = jnp.asarray(t, jnp.int32)
    xt = schedules.add_noise(ours, jnp.asarray(x0), jnp.asarray(eps), t_B)
    v = schedules.velocity(ours, jnp.asarray(x0), jnp.asarray(eps), t_B)
    assert xt.shape == x0.shape and xt.dtype == jnp.float32
    assert _max_rel(xt, xt_ref) <= 1e-6
    np.testing.assert_allclose(np.asarray(xt), xt_ref, rtol=1e-6, atol=1e-6)
    assert _max_rel(v, v_ref) <= 1e-6
    np.testing.assert_allclose(np.asarray(v), v_ref, rtol=1e-6, atol=1e-6)
    # per-sample: t = 0 keeps almost all signal, t = 999 is almost pure noise
    assert np.abs(np.asarray(xt)[0] - x0[0]).max() < 0.1
    assert np.abs(np.asarray(xt)[-1] - eps[-1]).max() < 0.3


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_predicted_x0_matches_ddpm_step_pred_original_sample(inputs, prediction_type):
    x_t, out, t = inputs  # any x_t and UNet output: the map is linear in both
    ours = schedules.make_schedule(1000, "linear", 0.0001, 0.02)
    ref = diffusers.DDPMScheduler(
        beta_schedule="linear", prediction_type=prediction_type, clip_sample=False
    )
    got = schedules.predicted_x0(
        ours, jnp.asarray(x_t), jnp.asarray(out), jnp.asarray(t, jnp.int32), prediction_type
    )
    for i, step in enumerate(t.tolist()):
        want = ref.step(
            torch.from_numpy(out[i : i + 1]), step, torch.from_numpy(x_t[i : i + 1])
        ).pred_original_sample.numpy()
        np.testing.assert_allclose(np.asarray(got[i : i + 1]), want, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        schedules.predicted_x0(ours, jnp.asarray(x_t), jnp.asarray(out), jnp.asarray(t), "x0")


def test_training_target(inputs):
    x0, eps, t = inputs
    sched = schedules.make_schedule()
    args = (sched, jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t, jnp.int32))
    np.testing.assert_array_equal(np.asarray(schedules.training_target(*args, "epsilon")), eps)
    np.testing.assert_array_equal(
        np.asarray(schedules.training_target(*args, "v_prediction")),
        np.asarray(schedules.velocity(*args)),
    )
    np.testing.assert_array_equal(np.asarray(schedules.training_target(*args, "sample")), x0)
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        schedules.training_target(*args, "x0")


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_min_snr_weights_match_diffusers_snr_gamma_recipe(prediction_type):
    from diffusers.training_utils import compute_snr

    ours = schedules.make_schedule(1000, "scaled_linear", 0.00085, 0.012)
    ref = _diffusers("scaled_linear", 0.00085, 0.012)
    t = np.array([0, 1, 100, 250, 500, 998, 999], np.int64)
    snr = compute_snr(ref, torch.from_numpy(t))
    # diffusers' train_text_to_image.py --snr_gamma 5, with 'sample' left at min(snr, gamma)
    want = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        want = want / snr
    elif prediction_type == "v_prediction":
        want = want / (snr + 1)
    got = schedules.snr_loss_weights(ours, jnp.asarray(t, jnp.int32), 5.0, prediction_type)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=2e-6)
    if prediction_type == "epsilon":  # noisy end: SNR < gamma, plain eps mse; clean end: gamma/SNR
        assert float(got[-1]) == pytest.approx(1.0) and float(got[0]) < 0.01
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        schedules.snr_loss_weights(ours, jnp.asarray(t, jnp.int32), 5.0, "x0")


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_truncated_snr_weights_by_hand(prediction_type):
    # x0-error weight clip(SNR, 1, gamma) (Salimans & Ho 2022's max(SNR, 1), capped), written
    # out in float64 from diffusers' alphas_cumprod, then moved to the target's own error
    ours = schedules.make_schedule(1000, "linear", 0.0001, 0.02)
    abar = _diffusers("linear", 0.0001, 0.02).alphas_cumprod.double().numpy()
    t = np.array([0, 10, 100, 124, 250, 500, 999])
    snr = abar[t] / (1 - abar[t])
    x0_weight = np.array([min(max(s, 1.0), 20.0) for s in snr])
    to_own = {"epsilon": snr, "v_prediction": snr + 1, "sample": np.ones_like(snr)}
    want = x0_weight / to_own[prediction_type]
    got = schedules.snr_loss_weights(
        ours, jnp.asarray(t, jnp.int32), 20.0, prediction_type, "truncated_snr"
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    # all three regimes occur: capped (t = 0, 10), SNR itself (t = 124, 250), floor 1 (500, 999)
    assert snr[1] > 20 > snr[3] > snr[4] > 1 > snr[5]
    with pytest.raises(ValueError, match="snr_weighting='p2'"):
        schedules.snr_loss_weights(ours, jnp.asarray(t, jnp.int32), 5.0, "sample", "p2")


def test_bad_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="config.diffusion.beta_schedule='cosine'"):
        schedules.make_schedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        schedules.make_schedule(num_train_timesteps=0)


def test_add_noise_under_jit_with_a_schedule_argument(inputs):
    x0, eps, t = inputs
    sched = schedules.make_schedule()
    fn = jax.jit(schedules.add_noise)  # the schedule is a pytree argument
    np.testing.assert_allclose(  # jit may fuse into FMAs: 1 ulp apart
        np.asarray(fn(sched, x0, eps, jnp.asarray(t, jnp.int32))),
        np.asarray(schedules.add_noise(sched, x0, eps, jnp.asarray(t, jnp.int32))),
        rtol=1e-6,
        atol=1e-6,
    )


def test_sample_timesteps_uniform_in_range():
    t_B = schedules.sample_timesteps(jax.random.key(0), 20000, 1000)
    t = np.asarray(t_B)
    assert t.shape == (20000,) and t.dtype == np.int32
    assert t.min() == 0 and t.max() == 999
    counts = np.bincount(t // 100, minlength=10)  # 10 bins of 100 steps: ~2000 each
    assert np.all(np.abs(counts - 2000) < 200), counts
    again = np.asarray(schedules.sample_timesteps(jax.random.key(0), 20000, 1000))
    np.testing.assert_array_equal(t, again)
