"""The DDPM training schedules Stable Diffusion uses, forward noising and training targets.

Pure jnp. Mirrors diffusers' `schedulers/scheduling_ddpm.py` (DDPMScheduler.__init__,
add_noise, get_velocity) value for value: the betas are built in float32 exactly as
`torch.linspace(..., dtype=torch.float32)` builds them, and the cumulative product is taken in
float64 and rounded to float32, as torch's CPU cumprod accumulates float32 in double. The
result is bit-identical to diffusers' `alphas_cumprod` for SD's schedules (tests check it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # config.model.prediction_type
SNR_WEIGHTINGS = ("min_snr", "truncated_snr")  # config.diffusion.snr_weighting
TIMESTEP_SAMPLINGS = ("uniform", "lognormal_sigma")  # config.diffusion.timestep_sampling


class Schedule(NamedTuple):
    """A DDPM noise schedule (a pytree of float32 [T] arrays)."""

    betas_T: jax.Array
    alphas_cumprod_T: jax.Array
    sqrt_alphas_cumprod_T: jax.Array
    sqrt_one_minus_alphas_cumprod_T: jax.Array

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas_T.shape[0])


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace computed like torch's CPU kernel (first half from start, rest from end)."""
    if steps == 1:
        return np.array([start], np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    values = np.where(
        idx < steps // 2,
        np.float64(start32) + step * idx,
        np.float64(end32) - step * (steps - 1 - idx),
    )
    return values.astype(np.float32)


def make_schedule(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> Schedule:
    """The DDPM schedule of diffusers' DDPMScheduler with the same arguments.

    'scaled_linear' (SD1.x, SD2.x, SDXL): betas = linspace(sqrt(beta_start), sqrt(beta_end))**2.
    'linear': betas = linspace(beta_start, beta_end).
    """
    if num_train_timesteps < 1:
        raise ValueError(
            f"config.diffusion.num_train_timesteps={num_train_timesteps}: must be >= 1"
        )
    if beta_schedule == "scaled_linear":
        betas = _torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "linear":
        betas = _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    else:
        raise ValueError(
            f"config.diffusion.beta_schedule={beta_schedule!r}: expected one of {BETA_SCHEDULES}"
        )
    betas = betas.astype(np.float32)
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(
            f"config.diffusion.beta_start={beta_start}, beta_end={beta_end}: betas must lie in "
            "(0, 1)"
        )
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    return Schedule(
        betas_T=jnp.asarray(betas),
        alphas_cumprod_T=jnp.asarray(alphas_cumprod),
        sqrt_alphas_cumprod_T=jnp.asarray(np.sqrt(alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod_T=jnp.asarray(
            np.sqrt((np.float32(1.0) - alphas_cumprod).astype(np.float32))
        ),
    )


def _per_sample(values_T: jax.Array, t_B: jax.Array, ndim: int) -> jax.Array:
    """values[t] reshaped to [B, 1, ..., 1] to broadcast against a rank-`ndim` batch."""
    v_B = jnp.take(values_T, jnp.asarray(t_B), axis=0)
    return v_B.reshape(v_B.shape + (1,) * (ndim - v_B.ndim))


def add_noise(
    schedule: Schedule, x0_BxCxHxW: jax.Array, eps_BxCxHxW: jax.Array, t_B: jax.Array
) -> jax.Array:
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps (diffusers DDPMScheduler.add_noise)."""
    ndim = x0_BxCxHxW.ndim
    a_B1 = _per_sample(schedule.sqrt_alphas_cumprod_T, t_B, ndim)
    s_B1 = _per_sample(schedule.sqrt_one_minus_alphas_cumprod_T, t_B, ndim)
    return a_B1 * x0_BxCxHxW + s_B1 * eps_BxCxHxW


def velocity(
    schedule: Schedule, x0_BxCxHxW: jax.Array, eps_BxCxHxW: jax.Array, t_B: jax.Array
) -> jax.Array:
    """v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0 (diffusers DDPMScheduler.get_velocity)."""
    ndim = x0_BxCxHxW.ndim
    a_B1 = _per_sample(schedule.sqrt_alphas_cumprod_T, t_B, ndim)
    s_B1 = _per_sample(schedule.sqrt_one_minus_alphas_cumprod_T, t_B, ndim)
    return a_B1 * eps_BxCxHxW - s_B1 * x0_BxCxHxW


def training_target(
    schedule: Schedule,
    x0_BxCxHxW: jax.Array,
    eps_BxCxHxW: jax.Array,
    t_B: jax.Array,
    prediction_type: str,
) -> jax.Array:
    """The regression target of the UNet: eps ('epsilon'), v ('v_prediction', SD2.1-768) or
    the clean sample x0 ('sample', diffusers' name; DDPMScheduler.step uses the output as x0)."""
    if prediction_type == "epsilon":
        return eps_BxCxHxW
    if prediction_type == "v_prediction":
        return velocity(schedule, x0_BxCxHxW, eps_BxCxHxW, t_B)
    if prediction_type == "sample":
        return x0_BxCxHxW
    raise ValueError(
        f"config.model.prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}"
    )


def predicted_x0(
    schedule: Schedule,
    x_t_BxCxHxW: jax.Array,
    out_BxCxHxW: jax.Array,
    t_B: jax.Array,
    prediction_type: str,
) -> jax.Array:
    """The clean sample a UNet output implies at x_t (DDPMScheduler.step's
    pred_original_sample): (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) for 'epsilon',
    sqrt(abar_t) x_t - sqrt(1 - abar_t) v for 'v_prediction', the output itself for 'sample'."""
    ndim = x_t_BxCxHxW.ndim
    a_B1 = _per_sample(schedule.sqrt_alphas_cumprod_T, t_B, ndim)
    s_B1 = _per_sample(schedule.sqrt_one_minus_alphas_cumprod_T, t_B, ndim)
    if prediction_type == "epsilon":
        return (x_t_BxCxHxW - s_B1 * out_BxCxHxW) / a_B1
    if prediction_type == "v_prediction":
        return a_B1 * x_t_BxCxHxW - s_B1 * out_BxCxHxW
    if prediction_type == "sample":
        return out_BxCxHxW
    raise ValueError(
        f"config.model.prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}"
    )


def snr_loss_weights(
    schedule: Schedule,
    t_B: jax.Array,
    snr_gamma: float,
    prediction_type: str,
    weighting: str = "min_snr",
) -> jax.Array:
    """SNR-based loss weights [B] for the mse of `prediction_type`'s own target.

    Each weighting is a weight w_t of the x0 error |x0_hat - x0|^2, SNR_t = abar_t / (1 - abar_t)
    (diffusers.training_utils.compute_snr):
      'min_snr'        w_t = min(SNR_t, gamma): Min-SNR-gamma (Hang et al. 2023), as diffusers'
                       train_text_to_image.py applies --snr_gamma;
      'truncated_snr'  w_t = clip(SNR_t, 1, gamma): Salimans & Ho 2022's truncated SNR weighting
                       max(SNR_t, 1) (Progressive Distillation), capped at gamma so that the
                       few nearly clean timesteps (SNR up to 1e3-1e4) cannot swamp a batch.
                       Noisy timesteps (SNR < 1) keep the plain x0 mse's weight 1; cleaner
                       ones weigh up to gamma.
    The eps error is SNR_t times the x0 error and the v error SNR_t + 1 times, so the weight of
    the target's own mse is w_t / SNR_t for 'epsilon', w_t / (SNR_t + 1) for 'v_prediction' and
    w_t for 'sample' (x0)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"config.model.prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}"
        )
    if weighting not in SNR_WEIGHTINGS:
        raise ValueError(
            f"config.diffusion.snr_weighting={weighting!r}: expected one of {SNR_WEIGHTINGS}"
        )
    abar_B = jnp.take(schedule.alphas_cumprod_T, jnp.asarray(t_B), axis=0)
    snr_B = abar_B / (1.0 - abar_B)
    low = 0.0 if weighting == "min_snr" else 1.0
    weights_B = jnp.clip(snr_B, low, jnp.float32(snr_gamma))
    if prediction_type == "epsilon":
        return weights_B / snr_B
    if prediction_type == "v_prediction":
        return weights_B / (snr_B + 1.0)
    return weights_B


def timestep_probabilities(
    schedule: Schedule,
    sampling: str = "uniform",
    *,
    log_sigma_mean: float = -1.2,
    log_sigma_std: float = 1.2,
    uniform_share: float = 0.0,
) -> np.ndarray:
    """float64 [T]: the probability of training at each timestep t.

    'uniform'          1 / T, as torch.randint(0, T) (DDPM, diffusers' training scripts).
    'lognormal_sigma'  EDM's training noise levels (Karras et al. 2022, section 5: ln sigma ~
                       N(log_sigma_mean, log_sigma_std^2), P_mean = -1.2 and P_std = 1.2 there)
                       on this schedule's discrete timesteps: t is the timestep whose noise
                       level sigma_t = sqrt((1 - abar_t) / abar_t) (EDM's units: x_t / sqrt(abar_t)
                       = x0 + sigma_t eps) is nearest to sigma in ln sigma, so p_t is the normal
                       probability of ln sigma_t's cell between the midpoints to its neighbours
                       (the first and last cells open-ended). Then mixed with the uniform
                       distribution: (1 - uniform_share) p_t + uniform_share / T.
    Uniform timesteps spend half of a linear-beta schedule's steps at sigma > 3, where an x0
    estimate can only be the prompt's mean image; EDM's centre sigma ~ 0.3 is where edges are
    decided. The uniform share keeps the noisy timesteps the sampler starts from trained."""
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(
            f"config.diffusion.timestep_sampling={sampling!r}: expected one of {TIMESTEP_SAMPLINGS}"
        )
    if not log_sigma_std > 0 or not 0.0 <= uniform_share <= 1.0:
        raise ValueError(
            f"timestep_log_sigma_std={log_sigma_std} must be > 0 and timestep_uniform_share="
            f"{uniform_share} in [0, 1]"
        )
    count = schedule.num_train_timesteps
    uniform_T = np.full(count, 1.0 / count)
    if sampling == "uniform":
        return uniform_T
    abar_T = np.asarray(schedule.alphas_cumprod_T, np.float64)
    log_sigma_T = 0.5 * np.log((1.0 - abar_T) / abar_T)  # increasing in t
    edges = np.concatenate([[-np.inf], (log_sigma_T[1:] + log_sigma_T[:-1]) / 2, [np.inf]])
    z = (edges - log_sigma_mean) / (log_sigma_std * np.sqrt(2.0))
    cdf = 0.5 * (1.0 + np.array([math.erf(v) for v in z]))
    return (1.0 - uniform_share) * np.diff(cdf) + uniform_share * uniform_T


def sample_timesteps(
    rng: jax.Array,
    batch: int,
    num_train_timesteps: int,
    probabilities_T: np.ndarray | None = None,
) -> jax.Array:
    """int32 [batch] in [0, num_train_timesteps): uniform like torch.randint(0, T, (batch,)), or
    drawn with `probabilities_T` (`timestep_probabilities`; None: uniform)."""
    if probabilities_T is None:
        return jax.random.randint(rng, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
    if len(probabilities_T) != num_train_timesteps:
        raise ValueError(f"{len(probabilities_T)} probabilities for {num_train_timesteps} steps")
    logits_T = jnp.log(jnp.asarray(np.maximum(probabilities_T, 1e-30), jnp.float32))
    return jax.random.categorical(rng, logits_T, shape=(batch,)).astype(jnp.int32)
