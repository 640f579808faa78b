"""Sampling in JAX: DDIM, DPM-Solver++ 2M and Euler with classifier-free guidance.

Each scheduler is reduced, on the host, to a table of per-step coefficients (float64 maths, stored
as float32) so that the whole denoising loop is one `jax.lax.fori_loop` under `jax.jit`:

    x_in    = c_in[i] * x                                   (Euler's scale_model_input; else 1)
    out     = cfg(model(x_in, t[i]))                        (uncond + g * (cond - uncond))
    x0[i]   = a[i] * x + b[i] * out                         (epsilon, v or sample -> x0)
    x_next  = p[i] * x + q[i] * x0[i] + r[i] * x0[i - 1]   (the solver update)

Every scheduler here is linear in (x, out) once clipping/thresholding is off, which is what
Stable Diffusion's scheduler configs use. The tables mirror diffusers 0.42:
schedulers/scheduling_ddim.py (DDIMScheduler, eta 0), scheduling_dpmsolver_multistep.py
(DPMSolverMultistepScheduler, algorithm_type "dpmsolver++", solver_order 2, solver_type
"midpoint", lower_order_final, final_sigmas_type "zero") and scheduling_euler_discrete.py
(EulerDiscreteScheduler, s_churn 0, interpolation "linear"), both also with use_karras_sigmas
(ScheduleConfig.use_karras_sigmas: Karras et al.'s rho = 7 noise levels), and the CFG of
pipelines/stable_diffusion/pipeline_stable_diffusion.py. tests/test_sampling.py checks them step
for step against diffusers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bdpo_jax import compile_options, host_memory
from bdpo_jax.schedules import PREDICTION_TYPES

SCHEDULERS = ("ddim", "dpmpp", "euler")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The base model's noise schedule and scheduler settings (defaults: SD1.5's scheduler)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # 'scaled_linear' | 'linear'
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # 'epsilon' | 'v_prediction' | 'sample' (x0)
    timestep_spacing: str = "leading"  # 'leading' | 'linspace' | 'trailing'
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # DDIM: alpha_cumprod after the last step (1 or alphas[0])
    # dpmpp/euler: Karras et al.'s rho = 7 noise levels instead of the spaced timesteps' (most
    # steps at low noise; the last model call near sigma_min instead of at t ~ T / num_steps)
    use_karras_sigmas: bool = False

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={self.prediction_type!r} is not supported; "
                f"choose one of {PREDICTION_TYPES}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing={self.timestep_spacing!r} is not supported; "
                f"choose one of {TIMESTEP_SPACINGS}"
            )
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(
                f"beta_schedule={self.beta_schedule!r} is not supported; "
                "choose 'scaled_linear' or 'linear'"
            )


# diffusers scheduler_config.json fields that change the maths and that we do not implement,
# with the value under which they are harmless.
_UNSUPPORTED_DIFFUSERS_FIELDS = {
    "trained_betas": None,
    "clip_sample": False,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
}


# diffusers' __init__ defaults (DDIM/PNDM/DPM/Euler agree except on timestep_spacing)
_DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "use_karras_sigmas": False,
}
_LINSPACE_BY_DEFAULT = {
    "DPMSolverMultistepScheduler": "linspace",
    "EulerDiscreteScheduler": "linspace",
}


def schedule_config_from_diffusers(config_or_path: Mapping[str, Any] | str) -> ScheduleConfig:
    """Reads a diffusers scheduler config (a dict, a scheduler_config.json, or its folder)."""
    source = "scheduler config"
    if isinstance(config_or_path, str | os.PathLike):
        path = os.fspath(config_or_path)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no scheduler config at {path}")
        with open(path) as f:
            config = json.load(f)
        source = path
    else:
        config = dict(config_or_path)
    for field, harmless in _UNSUPPORTED_DIFFUSERS_FIELDS.items():
        value = config.get(field)
        if (value is not None) if harmless is None else bool(value):
            raise ValueError(f"{source}: {field}={value!r} is not supported by bdpo_jax.sampling")
    # a field missing from the file takes the diffusers default of the config's class
    spacing = _LINSPACE_BY_DEFAULT.get(config.get("_class_name"), "leading")
    kwargs = {**_DIFFUSERS_DEFAULTS, "timestep_spacing": spacing}
    for name in kwargs:
        if config.get(name) is not None:
            kwargs[name] = config[name]
    return ScheduleConfig(**kwargs)


def schedule_config_from_config(config: Any) -> ScheduleConfig:
    """The ScheduleConfig of a run config: an ml_collections ConfigDict (configs/default.py) or
    the dict of a workdir's config.json (its diffusion, sample and model sections).
    use_karras_sigmas, which workdirs saved before it existed lack, takes ScheduleConfig's
    default."""

    def get(section: str, name: str, *default: Any) -> Any:
        part = config[section] if isinstance(config, Mapping) else getattr(config, section)
        if default and name not in part:
            return default[0]
        return part[name] if isinstance(part, Mapping) else getattr(part, name)

    return ScheduleConfig(
        num_train_timesteps=int(get("diffusion", "num_train_timesteps")),
        beta_schedule=str(get("diffusion", "beta_schedule")),
        beta_start=float(get("diffusion", "beta_start")),
        beta_end=float(get("diffusion", "beta_end")),
        prediction_type=str(get("model", "prediction_type")),
        timestep_spacing=str(get("sample", "timestep_spacing")),
        steps_offset=int(get("sample", "steps_offset")),
        set_alpha_to_one=bool(get("sample", "set_alpha_to_one")),
        use_karras_sigmas=bool(
            get("sample", "use_karras_sigmas", ScheduleConfig.use_karras_sigmas)
        ),
    )


def as_schedule_config(obj: ScheduleConfig | Mapping[str, Any] | Any) -> ScheduleConfig:
    """Accepts a ScheduleConfig, a run config (with .diffusion), or a dict of its fields."""
    if isinstance(obj, ScheduleConfig):
        return obj
    if (hasattr(obj, "diffusion") and hasattr(obj, "sample")) or (
        isinstance(obj, Mapping) and "diffusion" in obj and "sample" in obj
    ):
        return schedule_config_from_config(obj)
    if isinstance(obj, Mapping) or hasattr(obj, "to_dict"):
        items = dict(obj.to_dict() if hasattr(obj, "to_dict") else obj)
        names = {f.name for f in dataclasses.fields(ScheduleConfig)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(
                f"schedule_config has unknown fields {unknown}; known: {sorted(names)} "
                "(pass the whole run config, or sampling.schedule_config_from_config(config))"
            )
        return ScheduleConfig(**items)
    raise TypeError(f"schedule_config must be a ScheduleConfig or a mapping, got {type(obj)}")


class SamplerTable(NamedTuple):
    """Per-step coefficients of one scheduler run (arrays of length num_steps)."""

    timesteps: jax.Array  # model timestep per step (float32)
    c_in: jax.Array  # model input scale
    a: jax.Array  # x0 = a * x + b * out
    b: jax.Array
    p: jax.Array  # x_next = p * x + q * x0 + r * x0_prev
    q: jax.Array
    r: jax.Array
    init_sigma: jax.Array  # scalar: x_T = init_sigma * N(0, I)


def _alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    """alphas_cumprod of the DDPM schedule (float32 as diffusers has it), as float64."""
    from bdpo_jax.schedules import make_schedule

    schedule = make_schedule(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
    )
    return np.asarray(schedule.alphas_cumprod_T, dtype=np.float64)


def _timesteps(cfg: ScheduleConfig, num_steps: int, scheduler: str) -> np.ndarray:
    """The scheduler's set_timesteps(num_steps) for the configured spacing (float64)."""
    T = cfg.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps={T}]")
    spacing = cfg.timestep_spacing
    if scheduler == "dpmpp":  # DPMSolverMultistepScheduler.set_timesteps (lambda_min_clipped -inf)
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ratio = T // (num_steps + 1)
            ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            ts = ts + cfg.steps_offset
        else:
            ts = np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1
        return ts.astype(np.float64)
    if spacing == "linspace":
        if scheduler == "euler":  # Euler keeps the fractional timesteps
            return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].astype(np.float64)
        return np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.float64)
    if spacing == "leading":
        ratio = T // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.float64) + cfg.steps_offset
    ratio = T / num_steps
    return np.round(np.arange(T, 0, -ratio)).astype(np.float64) - 1


KARRAS_RHO = 7.0  # Karras et al. (2022), eq. 5; diffusers' _convert_to_karras


def _karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int) -> np.ndarray:
    """`num_steps` noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, num_steps)
    hi, lo = sigma_max ** (1 / KARRAS_RHO), sigma_min ** (1 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO


def _sigma_to_t(sigmas: np.ndarray, log_sigmas_T: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear interpolation of log sigma between the two
    neighbouring training timesteps (diffusers' _sigma_to_t, vectorised)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas_T, log_sigma, side="right") - 1, 0, None)
    low = np.minimum(low, len(log_sigmas_T) - 2)
    w = np.clip((log_sigmas_T[low] - log_sigma) / (log_sigmas_T[low] - log_sigmas_T[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _step_sigmas(
    cfg: ScheduleConfig, ts: np.ndarray, ac: np.ndarray, scheduler: str
) -> tuple[np.ndarray, np.ndarray]:
    """(model timesteps, sigma per step) of dpmpp/euler: the spaced timesteps and their
    interpolated sigmas, or with use_karras_sigmas the rho = 7 levels and their timesteps.
    DPM-Solver++ spans the whole schedule and rounds the timesteps; Euler spans the spaced
    timesteps' sigmas and keeps fractional ones (diffusers' set_timesteps of each)."""
    sig_all = np.sqrt((1 - ac) / ac)
    sig = np.interp(ts, np.arange(len(sig_all)), sig_all)
    if not cfg.use_karras_sigmas:
        return ts, sig
    if scheduler == "dpmpp":
        sig = _karras_sigmas(sig_all[-1], sig_all[0], len(ts))
        return np.round(_sigma_to_t(sig, np.log(sig_all))), sig
    sig = _karras_sigmas(sig[0], sig[-1], len(ts))
    return _sigma_to_t(sig, np.log(sig_all)), sig


def _x0_is_output(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of prediction_type 'sample': the model's output is x0 (every diffusers scheduler:
    pred_original_sample = model_output)."""
    return np.zeros(n), np.ones(n)


def _ddim_table(cfg: ScheduleConfig, ts: np.ndarray, ac: np.ndarray) -> dict[str, np.ndarray]:
    """DDIMScheduler.step with eta 0 (scheduling_ddim.py), clip_sample off."""
    T, n = cfg.num_train_timesteps, len(ts)
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    t_int = ts.astype(np.int64)
    prev = t_int - T // n  # DDIM steps back by T // n whatever the spacing
    ac_t = ac[t_int]
    ac_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
    if cfg.prediction_type == "epsilon":
        a, b = 1 / np.sqrt(ac_t), -np.sqrt(1 - ac_t) / np.sqrt(ac_t)
    elif cfg.prediction_type == "v_prediction":
        a, b = np.sqrt(ac_t), -np.sqrt(1 - ac_t)
    else:
        a, b = _x0_is_output(n)
    # x_prev = sqrt(ac_prev) x0 + sqrt(1 - ac_prev) eps, eps = (x - sqrt(ac_t) x0) / sqrt(1 - ac_t)
    p = np.sqrt(1 - ac_prev) / np.sqrt(1 - ac_t)
    q = np.sqrt(ac_prev) - p * np.sqrt(ac_t)
    return dict(c_in=np.ones(n), a=a, b=b, p=p, q=q, r=np.zeros(n), init_sigma=1.0)


def _dpmpp_table(cfg: ScheduleConfig, sig_steps: np.ndarray) -> dict[str, np.ndarray]:
    """DPMSolverMultistepScheduler, dpmsolver++ order 2 midpoint, lower_order_final, sigma_N = 0."""
    n = len(sig_steps)
    sig = np.concatenate([sig_steps, [0.0]])
    alpha = 1 / np.sqrt(sig**2 + 1)  # _sigma_to_alpha_sigma_t
    sigma = sig * alpha
    if cfg.prediction_type == "epsilon":
        a, b = 1 / alpha[:n], -sigma[:n] / alpha[:n]
    elif cfg.prediction_type == "v_prediction":
        a, b = alpha[:n], -sigma[:n]
    else:
        a, b = _x0_is_output(n)
    exp_neg_h = sig[1:] / sig[:n]  # exp(-(lambda_{i+1} - lambda_i)), lambda = -log(sig)
    p = sigma[1:] / sigma[:n]
    first_q = -alpha[1:] * (exp_neg_h - 1)
    q, r = first_q.copy(), np.zeros(n)
    for i in range(1, n - 1):  # step 0 has no history; the last step is first order (sigma 0)
        h = np.log(sig[i] / sig[i + 1])
        h0 = np.log(sig[i - 1] / sig[i])
        r0 = h0 / h
        # D0 = x0_i, D1 = (x0_i - x0_{i-1}) / r0; x = p x + first_q * (D0 + 0.5 * D1)
        q[i] = first_q[i] * (1 + 0.5 / r0)
        r[i] = -first_q[i] * 0.5 / r0
    return dict(c_in=np.ones(n), a=a, b=b, p=p, q=q, r=r, init_sigma=1.0)


def _euler_table(cfg: ScheduleConfig, sig_steps: np.ndarray) -> dict[str, np.ndarray]:
    """EulerDiscreteScheduler.step with s_churn 0 (scheduling_euler_discrete.py)."""
    n = len(sig_steps)
    sig = np.concatenate([sig_steps.astype(np.float32).astype(np.float64), [0.0]])
    s = sig[:n]
    if cfg.prediction_type == "epsilon":
        a, b = np.ones(n), -s
    elif cfg.prediction_type == "v_prediction":
        a, b = 1 / (s**2 + 1), -s / np.sqrt(s**2 + 1)
    else:
        a, b = _x0_is_output(n)
    p = sig[1:] / s  # x + (x - x0) / s * (s_next - s)
    max_sigma = float(sig.max())
    init = max_sigma if cfg.timestep_spacing != "leading" else float(np.sqrt(max_sigma**2 + 1))
    return dict(c_in=1 / np.sqrt(s**2 + 1), a=a, b=b, p=p, q=1 - p, r=np.zeros(n), init_sigma=init)


def make_sampler_table(
    scheduler: str, num_steps: int, schedule_config: ScheduleConfig | Mapping[str, Any]
) -> SamplerTable:
    """Coefficient table of `scheduler` ('ddim' | 'dpmpp' | 'euler') for `num_steps` steps."""
    cfg = as_schedule_config(schedule_config)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not supported; choose one of {SCHEDULERS}")
    ts, ac = _timesteps(cfg, int(num_steps), scheduler), _alphas_cumprod(cfg)
    if scheduler == "ddim":
        if cfg.use_karras_sigmas:
            raise ValueError("use_karras_sigmas needs scheduler 'dpmpp' or 'euler' (DDIM has none)")
        table = _ddim_table(cfg, ts, ac)
    else:
        ts, sig = _step_sigmas(cfg, ts, ac, scheduler)
        table = (_dpmpp_table if scheduler == "dpmpp" else _euler_table)(cfg, sig)
    f32 = {k: jnp.asarray(np.asarray(v, np.float64), jnp.float32) for k, v in table.items()}
    return SamplerTable(timesteps=jnp.asarray(ts, jnp.float32), **f32)


def scheduler_step(
    table: SamplerTable,
    i: jax.Array | int,
    x_BxCxHxW: jax.Array,
    out_BxCxHxW: jax.Array,
    x0_prev_BxCxHxW: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One solver step i from model output `out`; returns (x_next, x0_pred) in float32."""
    x = x_BxCxHxW.astype(jnp.float32)
    out = out_BxCxHxW.astype(jnp.float32)
    x0 = table.a[i] * x + table.b[i] * out
    x_next = table.p[i] * x + table.q[i] * x0 + table.r[i] * x0_prev_BxCxHxW
    return x_next, x0


def guided_output(out_2BxCxHxW: jax.Array, guidance_scale: jax.Array | float) -> jax.Array:
    """Classifier-free guidance on a [uncond; cond] batch: uncond + g * (cond - uncond)."""
    out_uncond, out_cond = jnp.split(out_2BxCxHxW.astype(jnp.float32), 2, axis=0)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


ApplyFn = Callable[..., jax.Array]


def _denoise_loop(
    apply_fn: ApplyFn,
    params: Any,
    x_BxCxHxW: jax.Array,
    table: SamplerTable,
    text_BxLxD: jax.Array,
    uncond_BxLxD: jax.Array,
    guidance_scale: jax.Array,
    added_cond_kwargs: Mapping[str, jax.Array] | None,
    uncond_added_cond_kwargs: Mapping[str, jax.Array] | None,
    *,
    do_cfg: bool,
) -> jax.Array:
    """The whole denoising loop (one fori_loop); CFG doubles the batch as diffusers does."""
    if do_cfg:
        text = jnp.concatenate([uncond_BxLxD, text_BxLxD], axis=0)
        added = None
        if added_cond_kwargs is not None:
            added = {
                k: jnp.concatenate([uncond_added_cond_kwargs[k], v], axis=0)
                for k, v in added_cond_kwargs.items()
            }
    else:
        text, added = text_BxLxD, added_cond_kwargs

    def body(i, carry):
        x, x0_prev = carry
        x_in = x * table.c_in[i]
        if do_cfg:
            x_in = jnp.concatenate([x_in, x_in], axis=0)
        t = jnp.full((x_in.shape[0],), table.timesteps[i], jnp.float32)
        out = apply_fn({"params": params}, x_in, t, text, added_cond_kwargs=added)
        out = guided_output(out, guidance_scale) if do_cfg else out.astype(jnp.float32)
        return scheduler_step(table, i, x, out, x0_prev)

    x0 = jnp.zeros_like(x_BxCxHxW, jnp.float32)
    num_steps = table.timesteps.shape[0]
    x, _ = jax.lax.fori_loop(0, num_steps, body, (x_BxCxHxW.astype(jnp.float32), x0))
    return x


_LOOP_CACHE: dict[Any, tuple[Any, Callable[..., jax.Array]]] = {}


def _jitted_loop(model: Any) -> Callable[..., jax.Array]:
    """One jitted loop per model: equal (hashable) Flax modules share it, so a model rebuilt
    from the same config does not recompile; other objects are keyed by identity."""
    try:
        key: Any = ("eq", model)
        hit = _LOOP_CACHE.get(key)
    except TypeError:  # unhashable model: identity (the cache keeps it alive, so ids stay unique)
        key = ("id", id(model))
        hit = _LOOP_CACHE.get(key)
    if hit is None:
        fn = compile_options.jit(
            functools.partial(_denoise_loop, model.apply), static_argnames=("do_cfg",)
        )
        if len(_LOOP_CACHE) >= 8:
            _LOOP_CACHE.pop(next(iter(_LOOP_CACHE)))
        hit = _LOOP_CACHE[key] = (model, fn)
    return hit[1]


def _broadcast_batch(name: str, arr: jax.Array, batch: int) -> jax.Array:
    arr = jnp.asarray(arr)
    if arr.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch {arr.shape[0]}; expected 1 or {batch}")
    return jnp.broadcast_to(arr, (batch, *arr.shape[1:]))


def sample(
    model: Any,
    params: Any,
    text_BxLxD: jax.Array,
    uncond_text: jax.Array,
    rng: jax.Array,
    *,
    scheduler: str = "ddim",
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    latent_shape: tuple[int, ...],
    schedule_config: ScheduleConfig | Mapping[str, Any] = ScheduleConfig(),
    added_cond_kwargs: Mapping[str, jax.Array] | None = None,
    uncond_added_cond_kwargs: Mapping[str, jax.Array] | None = None,
    init_noise_BxCxHxW: jax.Array | None = None,
) -> jax.Array:
    """Generates latents [B, C, H, W] (float32) from prompt embeddings, like a diffusers pipeline.

    Args:
      model: anything with `apply({"params": p}, x_NCHW, t_B, text_BxLxD, added_cond_kwargs=)`.
      text_BxLxD: prompt embeddings; uncond_text: [1 or B, L, D] embeddings of the negative prompt.
      latent_shape: (C, H, W) or (B, C, H, W) of the latents.
      guidance_scale: CFG scale; <= 1 runs the conditional model only (diffusers' rule).
      added_cond_kwargs: SDXL {"text_embeds": [B, P], "time_ids": [B, 6]};
        uncond_added_cond_kwargs are those of the negative prompt (default: the same).
      init_noise_BxCxHxW: starting noise N(0, I) instead of drawing it from `rng`.
    """
    text = jnp.asarray(text_BxLxD)
    batch = text.shape[0]
    shape = tuple(latent_shape)
    if len(shape) == 4:
        if shape[0] != batch:
            raise ValueError(f"latent_shape {shape} has batch {shape[0]}, text has {batch}")
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"latent_shape must be (C, H, W) or (B, C, H, W), got {latent_shape}")
    do_cfg = float(guidance_scale) > 1.0
    if do_cfg and uncond_text is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs uncond_text embeddings")
    table = make_sampler_table(scheduler, num_steps, schedule_config)
    if init_noise_BxCxHxW is None:
        noise = jax.random.normal(rng, (batch, *shape), jnp.float32)
    else:
        noise = jnp.asarray(init_noise_BxCxHxW, jnp.float32)
        if noise.shape != (batch, *shape):
            raise ValueError(f"init_noise has shape {noise.shape}, expected {(batch, *shape)}")
    uncond = _broadcast_batch("uncond_text", uncond_text, batch) if do_cfg else text
    if added_cond_kwargs is not None:
        added_cond_kwargs = {
            k: _broadcast_batch(f"added_cond_kwargs[{k!r}]", v, batch)
            for k, v in added_cond_kwargs.items()
        }
        uncond_added = uncond_added_cond_kwargs or added_cond_kwargs
        uncond_added_cond_kwargs = {
            k: _broadcast_batch(f"uncond_added_cond_kwargs[{k!r}]", uncond_added[k], batch)
            for k in added_cond_kwargs
        }
    host_memory.keep_freed_memory(host_memory.fp32_bytes(params))
    loop = _jitted_loop(model)
    return loop(
        params,
        noise * table.init_sigma,
        table,
        text,
        uncond,
        jnp.float32(guidance_scale),
        added_cond_kwargs,
        uncond_added_cond_kwargs,
        do_cfg=do_cfg,
    )
