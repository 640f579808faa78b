"""bdpo_jax.sampling against diffusers' schedulers and pipeline CFG, step for step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdpo_jax import sampling

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
DDIMScheduler = diffusers.DDIMScheduler
DPMSolverMultistepScheduler = diffusers.DPMSolverMultistepScheduler
EulerDiscreteScheduler = diffusers.EulerDiscreteScheduler

# Stable Diffusion 1.5's scheduler_config.json (a PNDMScheduler config; pipelines build the
# other schedulers from it with from_config).
SD_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "timestep_spacing": "leading",  # PNDM's default, which from_config of a pipeline carries over
}
DIFFUSERS = {
    "ddim": DDIMScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
SHAPE = (2, 4, 5, 6)


def _fixed_arrays():
    rng = np.random.default_rng(0)
    w = rng.uniform(0.2, 0.9, SHAPE[1:]).astype(np.float32)
    bias = rng.normal(size=SHAPE[1:]).astype(np.float32)
    noise = rng.normal(size=SHAPE).astype(np.float32)
    return w, bias, noise


def _fake_out(x, t, w, bias, lib):
    """A fixed function of (x, t) standing in for the UNet: same maths in numpy/torch/jnp."""
    return w[None] * x * lib.cos(t / 300.0) + 0.3 * lib.sin(t / 100.0) * bias[None]


def _diffusers_run(name, num_steps, schedule_kwargs, noise, w, bias):
    sched = DIFFUSERS[name].from_config({**SD_SCHEDULER_CONFIG, **schedule_kwargs})
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    w_t, b_t = torch.from_numpy(w), torch.from_numpy(bias)
    xs = []
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        tf = torch.tensor(float(t), dtype=torch.float32)
        out = _fake_out(x_in, tf, w_t, b_t, torch)
        x = sched.step(out, t, x).prev_sample
        xs.append(x.numpy().copy())
    return sched.timesteps.numpy().astype(np.float64), xs


CASES = [  # (scheduler, prediction type, timestep spacing, steps, other scheduler config)
    ("ddim", "epsilon", "leading", 10, {}),
    ("ddim", "epsilon", "linspace", 9, {"set_alpha_to_one": True, "beta_schedule": "linear"}),
    ("ddim", "v_prediction", "leading", 25, {}),
    ("ddim", "epsilon", "trailing", 7, {}),
    ("dpmpp", "epsilon", "leading", 10, {}),
    ("dpmpp", "v_prediction", "leading", 20, {}),
    ("dpmpp", "epsilon", "linspace", 16, {"steps_offset": 0}),
    ("euler", "epsilon", "leading", 12, {}),
    ("euler", "v_prediction", "linspace", 9, {}),
    ("euler", "epsilon", "trailing", 5, {"beta_schedule": "linear"}),
    ("ddim", "sample", "trailing", 6, {"beta_schedule": "linear"}),
    ("dpmpp", "sample", "trailing", 10, {"beta_schedule": "linear"}),
    ("euler", "sample", "leading", 8, {}),
    # Karras sigmas: DPM-Solver++ over the whole schedule, Euler over the spaced timesteps'
    ("dpmpp", "sample", "trailing", 8, {"beta_schedule": "linear", "use_karras_sigmas": True}),
    ("dpmpp", "epsilon", "leading", 25, {"use_karras_sigmas": True}),
    ("dpmpp", "v_prediction", "linspace", 10, {"use_karras_sigmas": True}),
    ("euler", "epsilon", "leading", 12, {"use_karras_sigmas": True}),
    ("euler", "sample", "trailing", 7, {"beta_schedule": "linear", "use_karras_sigmas": True}),
]


@pytest.mark.parametrize("name,prediction_type,spacing,num_steps,extra", CASES)
def test_steps_match_diffusers(name, prediction_type, spacing, num_steps, extra):
    w, bias, noise = _fixed_arrays()
    kwargs = {"prediction_type": prediction_type, "timestep_spacing": spacing, **extra}
    ref_ts, ref_xs = _diffusers_run(name, num_steps, kwargs, noise, w, bias)

    cfg = sampling.schedule_config_from_diffusers({**SD_SCHEDULER_CONFIG, **kwargs})
    table = sampling.make_sampler_table(name, num_steps, cfg)
    # Euler's Karras timesteps are fractional: diffusers takes their log sigmas from float32
    # torch maths (6e-5 of a timestep apart); every integer timestep must match exactly
    np.testing.assert_allclose(np.asarray(table.timesteps, np.float64), ref_ts, rtol=0, atol=1e-4)
    x = jnp.asarray(noise) * table.init_sigma
    x0_prev = jnp.zeros_like(x)
    for i in range(num_steps):
        out = _fake_out(x * table.c_in[i], table.timesteps[i], w, bias, jnp)
        x, x0_prev = sampling.scheduler_step(table, i, x, out, x0_prev)
        scale = max(1.0, float(np.abs(ref_xs[i]).max()))
        np.testing.assert_allclose(np.asarray(x), ref_xs[i], rtol=0, atol=1e-5 * scale)


class _FakeModel:
    """Stands in for the UNet in `sample`: uses x, t, the text and (optionally) SDXL kwargs."""

    def __init__(self, w, bias):
        self.w, self.bias = jnp.asarray(w), jnp.asarray(bias)

    def apply(self, variables, x, t_B, text_BxLxD, added_cond_kwargs=None):
        scale = variables["params"]["scale"]
        cond = jnp.mean(text_BxLxD, axis=(1, 2))
        if added_cond_kwargs is not None:
            cond = cond + jnp.mean(added_cond_kwargs["text_embeds"], axis=1)
        t = t_B[:, None, None, None]
        return scale * _fake_out(x, t, self.w, self.bias, jnp) + cond[:, None, None, None]


def _torch_pipeline_loop(name, num_steps, noise, text, uncond, g, w, bias, pooled=None):
    """diffusers StableDiffusionPipeline's loop (CFG as [uncond; cond]) on the fake model."""
    sched = DIFFUSERS[name].from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    emb = torch.cat([torch.from_numpy(uncond), torch.from_numpy(text)])
    cond = emb.mean(dim=(1, 2))
    if pooled is not None:
        cond = cond + torch.cat([torch.from_numpy(p) for p in pooled]).mean(dim=1)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(torch.cat([x, x]), t)
        tf = torch.tensor(float(t), dtype=torch.float32)
        out = 0.9 * _fake_out(x_in, tf, torch.from_numpy(w), torch.from_numpy(bias), torch)
        out = out + cond[:, None, None, None]
        out_u, out_c = out.chunk(2)
        x = sched.step(out_u + g * (out_c - out_u), t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("name", ["dpmpp", "euler"])
def test_sample_with_cfg_matches_pipeline_loop(name):
    w, bias, noise = _fixed_arrays()
    rng = np.random.default_rng(1)
    text = rng.normal(size=(2, 3, 8)).astype(np.float32)
    uncond = rng.normal(size=(1, 3, 8)).astype(np.float32)
    model, params = _FakeModel(w, bias), {"scale": jnp.float32(0.9)}
    got = sampling.sample(
        model,
        params,
        text,
        uncond,
        jax.random.key(0),
        scheduler=name,
        num_steps=8,
        guidance_scale=5.0,
        latent_shape=SHAPE[1:],
        init_noise_BxCxHxW=noise,
    )
    want = _torch_pipeline_loop(name, 8, noise, text, np.repeat(uncond, 2, 0), 5.0, w, bias)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_sample_sdxl_added_cond_and_rng():
    w, bias, noise = _fixed_arrays()
    rng = np.random.default_rng(2)
    text = rng.normal(size=(2, 3, 8)).astype(np.float32)
    uncond = rng.normal(size=(2, 3, 8)).astype(np.float32)
    pooled = rng.normal(size=(2, 4)).astype(np.float32)
    pooled_uncond = np.zeros((1, 4), np.float32)
    time_ids = np.tile(np.array([[8, 8, 0, 0, 8, 8]], np.float32), (2, 1))
    model, params = _FakeModel(w, bias), {"scale": jnp.float32(0.9)}
    kwargs = dict(
        scheduler="ddim",
        num_steps=6,
        guidance_scale=3.0,
        latent_shape=SHAPE,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        uncond_added_cond_kwargs={"text_embeds": pooled_uncond, "time_ids": time_ids},
    )
    got = sampling.sample(model, params, text, uncond, None, init_noise_BxCxHxW=noise, **kwargs)
    want = _torch_pipeline_loop(
        "ddim",
        6,
        noise,
        text,
        uncond,
        3.0,
        w,
        bias,
        pooled=[np.repeat(pooled_uncond, 2, 0), pooled],
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

    # noise drawn from the rng: deterministic per key, different across keys
    a = sampling.sample(model, params, text, uncond, jax.random.key(3), **kwargs)
    b = sampling.sample(model, params, text, uncond, jax.random.key(3), **kwargs)
    c = sampling.sample(model, params, text, uncond, jax.random.key(4), **kwargs)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_guidance_one_runs_conditional_only():
    w, bias, noise = _fixed_arrays()
    text = np.ones((2, 3, 8), np.float32)
    model, params = _FakeModel(w, bias), {"scale": jnp.float32(0.9)}
    kwargs = dict(scheduler="ddim", num_steps=4, latent_shape=SHAPE[1:], init_noise_BxCxHxW=noise)
    # guidance 1 ignores the (here wrongly shaped) negative embeddings entirely; CFG with the
    # negative equal to the prompt gives the conditional output whatever the scale
    got = sampling.sample(
        model, params, text, np.zeros((5, 3, 8)), None, guidance_scale=1.0, **kwargs
    )
    want = sampling.sample(model, params, text, text, None, guidance_scale=4.0, **kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_schedule_config_from_saved_scheduler(tmp_path):
    DDIMScheduler.from_config(
        {**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
    ).save_pretrained(tmp_path)
    cfg = sampling.schedule_config_from_diffusers(str(tmp_path))
    assert cfg == sampling.ScheduleConfig(prediction_type="v_prediction")
    # fields missing from a file take the defaults of its class, as diffusers' from_config does
    cfg = sampling.schedule_config_from_diffusers({"_class_name": "EulerDiscreteScheduler"})
    assert (cfg.timestep_spacing, cfg.steps_offset, cfg.beta_schedule) == ("linspace", 0, "linear")


def test_bad_inputs_raise_clear_errors(tmp_path):
    cfg = sampling.ScheduleConfig()
    with pytest.raises(ValueError, match="scheduler='heun'"):
        sampling.make_sampler_table("heun", 10, cfg)
    with pytest.raises(ValueError, match="num_steps=1001"):
        sampling.make_sampler_table("ddim", 1001, cfg)
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        sampling.ScheduleConfig(prediction_type="x0")
    with pytest.raises(ValueError, match="use_karras_sigmas needs scheduler 'dpmpp' or 'euler'"):
        sampling.make_sampler_table("ddim", 10, sampling.ScheduleConfig(use_karras_sigmas=True))
    with pytest.raises(ValueError, match="clip_sample=True"):
        sampling.schedule_config_from_diffusers({**SD_SCHEDULER_CONFIG, "clip_sample": True})
    with pytest.raises(ValueError, match="unknown fields"):
        sampling.as_schedule_config({"beta_strat": 0.1})
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        sampling.schedule_config_from_diffusers(str(tmp_path))
    model = _FakeModel(*_fixed_arrays()[:2])
    with pytest.raises(ValueError, match="needs uncond_text"):
        sampling.sample(
            model,
            {"scale": 1.0},
            np.zeros((2, 3, 8)),
            None,
            None,
            num_steps=2,
            latent_shape=SHAPE[1:],
        )
    with pytest.raises(ValueError, match="uncond_text has batch 3"):
        sampling.sample(
            model,
            {"scale": 1.0},
            np.zeros((2, 3, 8)),
            np.zeros((3, 3, 8)),
            jax.random.key(0),
            num_steps=2,
            latent_shape=SHAPE[1:],
        )


def test_schedule_config_from_run_config_and_json():
    import json

    from configs.default import get_config

    config = get_config()
    config.model.prediction_type = "v_prediction"
    config.sample.timestep_spacing = "trailing"
    want = sampling.ScheduleConfig(prediction_type="v_prediction", timestep_spacing="trailing")
    assert sampling.schedule_config_from_config(config) == want
    assert sampling.as_schedule_config(config) == want
    as_json = json.loads(config.to_json())  # a workdir's config.json
    assert sampling.as_schedule_config(as_json) == want
    del as_json["sample"]["use_karras_sigmas"]  # saved before the field existed: its default
    assert sampling.as_schedule_config(as_json) == want
    config.sample.use_karras_sigmas = True
    assert sampling.schedule_config_from_config(config).use_karras_sigmas
    with pytest.raises(ValueError, match="vae_scaling_factor"):  # config.diffusion alone
        sampling.as_schedule_config(config.diffusion)


def test_equal_models_share_one_compiled_loop():
    from bdpo_jax.models import UNet2DConditionModel
    from bdpo_jax.models.presets import tiny_unet_config

    a = UNet2DConditionModel.from_config(tiny_unet_config("sd15"))
    b = UNet2DConditionModel.from_config(tiny_unet_config("sd15"))
    c = UNet2DConditionModel.from_config(tiny_unet_config("sd15", in_channels=3))
    assert sampling._jitted_loop(a) is sampling._jitted_loop(b)
    assert sampling._jitted_loop(a) is not sampling._jitted_loop(c)
