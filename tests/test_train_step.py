"""The DPO train step and the reference refresh (the optimiser: tests/test_optim.py).

The step as the trainer builds it (bdpo_jax.train.make_train_step): its assembly (2B batch,
shared noise and timestep, targets, text dropout, accumulation) against a recomputation in the
test with a small probe model; the real tiny UNet for the paper's facts (loss log 2 and
accuracy 0 at step 0), overfitting a fixed batch and the refresh schedule.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bdpo_jax import data, schedules, schema, sharding, train, train_state
from bdpo_jax import train_step as ts
from configs import tiny

# --- step assembly with a small probe model ----------------------------------------------------


class _Probe(nn.Module):
    """A small conditional denoiser with the UNet's call signature (fast to compile)."""

    @nn.compact
    def __call__(self, x_NCHW, t_N, text_NxLxD, added_cond_kwargs=None, train=False):
        h = jnp.transpose(x_NCHW, (0, 2, 3, 1))
        t_emb = jnp.sin(t_N.astype(jnp.float32)[:, None] / (1.0 + jnp.arange(8.0))[None, :] / 100)
        cond = nn.Dense(8)(t_emb) + nn.Dense(8)(text_NxLxD.mean(axis=1))
        if added_cond_kwargs is not None:
            extra = jnp.concatenate(
                [added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"] / 100], -1
            )
            cond = cond + nn.Dense(8)(extra)
        h = nn.silu(nn.Conv(8, (3, 3))(h) + cond[:, None, None, :])
        return jnp.transpose(nn.Conv(x_NCHW.shape[1], (3, 3))(h), (0, 3, 1, 2))


class _Setup(NamedTuple):
    model: nn.Module
    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    state: train_state.TrainState
    batch: dict
    consts: dict
    step_fn: Callable  # train.make_train_step's step, unjitted
    step: Callable  # jax.jit(step_fn)
    tx: optax.GradientTransformation


def _probe_setup(pooled: bool = False, **overrides) -> _Setup:
    config = tiny.get_config()
    config.data.synthetic_pooled_dim = 6 if pooled else 0
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    ds, info = data.make_dataset(config.data, global_batch_size=8, seed=0, label_mode="majority")
    batch = next(iter(ds))
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "index"}
    model = _Probe()
    c, h, w = info.latent_shape
    args = [jnp.zeros((1, c, h, w)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, *info.text_shape))]
    if pooled:
        args.append({"text_embeds": jnp.zeros((1, 6)), "time_ids": jnp.zeros((1, 6))})
    params = model.init(jax.random.PRNGKey(1), *args)["params"]
    step_fn, tx, consts = train.make_train_step(config, info, model)
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ref_params=jax.tree.map(lambda x: x * 1.01, params),  # reference != policy
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(7),
    )
    consts = jax.tree.map(jnp.asarray, consts)
    return _Setup(model, config, info, state, batch, consts, step_fn, jax.jit(step_fn), tx)


def _manual_loss(setup: _Setup, label=None, timestep_probabilities_T=None, error=np.square):
    """The authors' recipe written out in numpy from the documented key derivation
    (timesteps drawn with `timestep_probabilities_T` by jax.random.categorical when given;
    `error`: the per-element error of pred - target, squared as the authors')."""
    model, state, batch, consts = setup.model, setup.state, setup.batch, setup.consts
    prediction_type = setup.config.model.prediction_type
    p_drop = setup.config.dpo.proportion_empty_prompts
    rng = jax.random.fold_in(state.rng, state.step)
    _, k_step = jax.random.split(rng)
    k_x1, k_x2, k_eps, k_t, k_drop = jax.random.split(k_step, 5)
    # SD's scaled_linear DDPM schedule, written out independently of bdpo_jax.schedules
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1.0 - betas)
    scale = setup.info.vae_scaling_factor

    def latents(m, key):
        m = np.asarray(m, np.float64)
        n = np.asarray(jax.random.normal(key, m[:, 0].shape), np.float64)
        return (m[:, 0] + np.exp(0.5 * np.clip(m[:, 1], -30, 20)) * n) * scale

    x1, x2 = latents(batch["moments_0"], k_x1), latents(batch["moments_1"], k_x2)
    eps = np.asarray(jax.random.normal(k_eps, x1.shape), np.float64)
    if timestep_probabilities_T is None:
        t = np.asarray(jax.random.randint(k_t, (x1.shape[0],), 0, 1000))
    else:
        logits_T = np.log(np.maximum(timestep_probabilities_T, 1e-30)).astype(np.float32)
        t = np.asarray(jax.random.categorical(k_t, logits_T, shape=(x1.shape[0],)))
    a = np.sqrt(acp[t])[:, None, None, None]
    s = np.sqrt(1 - acp[t])[:, None, None, None]
    drop = np.asarray(jax.random.uniform(k_drop, (x1.shape[0],))) < p_drop
    text = np.where(
        drop[:, None, None],
        np.asarray(consts["empty_text_embeds"])[None],
        np.asarray(batch["text_embeds"], np.float64),
    )
    added = None
    if "pooled_text_embeds" in batch:
        pooled = np.where(
            drop[:, None],
            np.asarray(consts["empty_pooled_text_embeds"])[None],
            np.asarray(batch["pooled_text_embeds"], np.float64),
        )
        added = {
            "text_embeds": jnp.asarray(pooled, jnp.float32),
            "time_ids": jnp.asarray(batch["add_time_ids"], jnp.float32),
        }

    def err(params, x0):
        xt = a * x0 + s * eps
        target = eps if prediction_type == "epsilon" else a * eps - s * x0
        pred = model.apply(
            {"params": params},
            jnp.asarray(xt, jnp.float32),
            jnp.asarray(t),
            jnp.asarray(text, jnp.float32),
            added_cond_kwargs=added,
        )
        return error(np.asarray(pred, np.float64) - target).mean(axis=(1, 2, 3))

    m1, m2 = err(state.params, x1), err(state.params, x2)
    r1, r2 = err(state.ref_params, x1), err(state.ref_params, x2)
    label = np.asarray(batch["label"] if label is None else label, np.float64)
    inside = -0.5 * float(consts["beta"]) * label * ((m1 - m2) - (r1 - r2))
    return {
        "loss": np.mean(np.logaddexp(0.0, -inside)),
        "implicit_accuracy": np.mean(inside > 0),
        "model_mse": 0.5 * (m1.mean() + m2.mean()),
        "ref_mse": 0.5 * (r1.mean() + r2.mean()),
        "model_diff": np.mean(label * (m1 - m2)),
        # plain SFT on the majority winner (image 1 on a tie), same noise and timestep
        "sft_loss": np.mean(np.where(label >= 0, m1, m2)),
        "sft_mse": np.where(label >= 0, m1, m2),
        "snr": acp[t] / (1.0 - acp[t]),
    }


@pytest.mark.parametrize(
    "pooled,overrides",
    [
        (False, {}),
        (False, {"model__prediction_type": "v_prediction", "dpo__proportion_empty_prompts": 0.5}),
        (True, {"dpo__proportion_empty_prompts": 0.5}),
    ],
)
def test_step_loss_equals_manual_recipe(pooled, overrides):
    s = _probe_setup(pooled, **overrides)
    new_state, metrics = s.step(s.state, s.batch, s.consts)
    want = _manual_loss(s)
    for name in ("model_mse", "ref_mse"):
        assert float(metrics[name]) == pytest.approx(want[name], rel=2e-6), name
    assert float(metrics["model_diff"]) == pytest.approx(want["model_diff"], rel=1e-3, abs=1e-6)
    # beta = 500 amplifies float32 rounding of the mse: 1e-4 relative on the loss
    assert float(metrics["loss"]) == pytest.approx(want["loss"], rel=1e-4)
    assert float(metrics["implicit_accuracy"]) == pytest.approx(want["implicit_accuracy"])
    assert int(new_state.step) == 1
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0


def test_single_scorer_steps_use_that_scorers_votes_and_share_one_program():
    batch = _probe_setup().batch
    votes_BxK, majority_B = np.asarray(batch["votes"]), np.asarray(batch["label"])
    # two scorers whose votes differ from the majority's and from each other's
    minority = [k for k in range(votes_BxK.shape[1]) if (votes_BxK[:, k] != majority_B).any()]
    picked = next(
        (a, b)
        for a in minority
        for b in minority
        if a < b and (votes_BxK[:, a] != votes_BxK[:, b]).any()
    )
    programs = []
    for k in picked:
        s = _probe_setup(label__mode="single", label__scorer=f"synthetic_{k}")
        _, metrics = s.step(s.state, s.batch, s.consts)
        want = _manual_loss(s, label=votes_BxK[:, k])
        assert float(metrics["loss"]) == pytest.approx(want["loss"], rel=1e-4)
        programs.append(s.step.lower(s.state, s.batch, s.consts).as_text())
    assert programs[0] == programs[1]  # the scorer is a runtime input, not a compile key


def test_sft_step_is_the_mean_mse_of_the_winners():
    s = _probe_setup(label__mode="sft")
    assert {-1.0, 1.0} <= set(np.asarray(s.batch["label"]).tolist())  # both winners occur
    _, metrics = s.step(s.state, s.batch, s.consts)
    want = _manual_loss(s)
    assert float(metrics["loss"]) == pytest.approx(want["sft_loss"], rel=2e-6)
    assert float(metrics["model_mse"]) == pytest.approx(want["sft_loss"], rel=2e-6)


def test_sft_min_snr_weights_each_winner_by_its_timestep():
    # Min-SNR-5 for epsilon-prediction, written out: min(SNR_t, 5) / SNR_t per image
    s = _probe_setup(label__mode="sft", diffusion__snr_gamma=5.0)
    _, metrics = s.step(s.state, s.batch, s.consts)
    want = _manual_loss(s)
    snr = want["snr"]
    assert snr.min() < 5.0 < snr.max()  # both branches of the min occur in this batch
    weighted = np.mean(np.minimum(snr, 5.0) / snr * want["sft_mse"])
    assert float(metrics["loss"]) == pytest.approx(weighted, rel=2e-6)
    assert float(metrics["model_mse"]) == pytest.approx(want["sft_loss"], rel=2e-6)


def test_sft_truncated_snr_weights_each_winner_by_its_timestep():
    # truncated SNR capped at 5 for epsilon-prediction, written out: clip(SNR_t, 1, 5) / SNR_t
    s = _probe_setup(
        label__mode="sft", diffusion__snr_gamma=5.0, diffusion__snr_weighting="truncated_snr"
    )
    _, metrics = s.step(s.state, s.batch, s.consts)
    want = _manual_loss(s)
    snr = want["snr"]
    assert snr.min() < 1.0 and snr.max() > 5.0  # the floor and the cap both occur
    weighted = np.mean(np.clip(snr, 1.0, 5.0) / snr * want["sft_mse"])
    assert float(metrics["loss"]) == pytest.approx(weighted, rel=2e-6)


def test_sft_lognormal_timesteps_draw_from_edm_noise_levels():
    s = _probe_setup(
        label__mode="sft",
        diffusion__timestep_sampling="lognormal_sigma",
        diffusion__timestep_uniform_share=0.25,
    )
    _, metrics = s.step(s.state, s.batch, s.consts)
    p = schedules.timestep_probabilities(
        schedules.make_schedule(), "lognormal_sigma", uniform_share=0.25
    )
    want = _manual_loss(s, timestep_probabilities_T=p)
    assert float(metrics["loss"]) == pytest.approx(want["sft_loss"], rel=2e-6)
    uniform = _manual_loss(s)  # the same keys drawn uniformly give another loss
    assert abs(uniform["sft_loss"] - want["sft_loss"]) > 1e-3 * want["sft_loss"]


@pytest.mark.parametrize(
    "loss_type,error",
    [
        ("l1", np.abs),
        # pseudo-Huber with c = 0.05, written out: c * (sqrt(d^2 + c^2) - c)
        ("pseudo_huber", lambda d: 0.05 * (np.sqrt(d**2 + 0.05**2) - 0.05)),
    ],
)
def test_sft_loss_type_sets_the_per_element_error(loss_type, error):
    s = _probe_setup(label__mode="sft", diffusion__loss_type=loss_type, diffusion__huber_c=0.05)
    _, metrics = s.step(s.state, s.batch, s.consts)
    want = _manual_loss(s, error=error)
    assert float(metrics["loss"]) == pytest.approx(want["sft_loss"], rel=2e-6)
    assert want["sft_loss"] != pytest.approx(_manual_loss(s)["sft_loss"], rel=1e-2)


def _check_sft_only_field(field, value, refusals):
    """config.diffusion.<field> = value is refused outside label mode 'sft' and accepted in it;
    then each (diffusion overrides, message) of `refusals`, applied in turn, is refused."""
    config = tiny.get_config()
    setattr(config.diffusion, field, value)
    with pytest.raises(schema.ConfigError, match="only with config.label.mode='sft'"):
        train.validate_config(config)
    config.label.mode = "sft"
    train.validate_config(config)
    for overrides, message in refusals:
        for name, v in overrides.items():
            setattr(config.diffusion, name, v)
        with pytest.raises(schema.ConfigError, match=message):
            train.validate_config(config)


def test_loss_type_config_errors():
    _check_sft_only_field(
        "loss_type",
        "l1",
        [
            ({"loss_type": "huber"}, "loss_type='huber': expected one of"),
            ({"loss_type": "pseudo_huber", "huber_c": 0.0}, "huber_c must be > 0"),
        ],
    )
    with pytest.raises(ValueError, match="the DPO loss compares mse"):
        ts.make_loss_fn(
            "dpo",
            None,
            schedules.make_schedule(),
            prediction_type="epsilon",
            vae_scaling_factor=1.0,
            proportion_empty_prompts=0.0,
            loss_type="l1",
        )


def test_timestep_sampling_config_errors():
    _check_sft_only_field(
        "timestep_sampling",
        "lognormal_sigma",
        [
            ({"timestep_sampling": "logit"}, "timestep_sampling='logit'"),
            (
                {"timestep_sampling": "lognormal_sigma", "timestep_log_sigma_std": 0.0},
                "timestep_log_sigma_std must be > 0",
            ),
            (
                {"timestep_log_sigma_std": 1.2, "timestep_uniform_share": -0.1},
                "timestep_uniform_share must lie in",
            ),
        ],
    )


def test_snr_gamma_outside_sft_is_a_config_error():
    config = tiny.get_config()
    config.diffusion.snr_gamma = 5.0
    with pytest.raises(schema.ConfigError, match="config.diffusion.snr_gamma=5.0"):
        train.validate_config(config)
    config.label.mode, config.diffusion.snr_gamma = "sft", -1.0
    with pytest.raises(schema.ConfigError, match="must be >= 0"):
        train.validate_config(config)
    config.diffusion.snr_gamma, config.diffusion.snr_weighting = 5.0, "p2"
    with pytest.raises(schema.ConfigError, match="config.diffusion.snr_weighting='p2'"):
        train.validate_config(config)
    config.diffusion.snr_gamma, config.diffusion.snr_weighting = 0.5, "truncated_snr"
    with pytest.raises(schema.ConfigError, match="need gamma >= 1"):
        train.validate_config(config)


def test_all_prompts_dropped_equals_empty_text_input():
    s = _probe_setup(dpo__proportion_empty_prompts=1.0)
    _, m_drop = s.step(s.state, s.batch, s.consts)
    s = _probe_setup(dpo__proportion_empty_prompts=0.0)
    state, batch, consts, step = s.state, s.batch, s.consts, s.step
    empty = jnp.broadcast_to(consts["empty_text_embeds"][None], batch["text_embeds"].shape)
    _, m_empty = step(state, {**batch, "text_embeds": empty.astype(jnp.float16)}, consts)
    _, m_text = step(state, batch, consts)
    assert float(m_drop["loss"]) == pytest.approx(float(m_empty["loss"]), rel=1e-6)
    assert float(m_drop["loss"]) != pytest.approx(float(m_text["loss"]), rel=1e-6)


def test_gradient_accumulation_averages_micro_batches():
    s = _probe_setup(optim__grad_accum_steps=2)
    state, batch, consts = s.state, s.batch, s.consts
    new_state, metrics = s.step(state, batch, consts)
    # by hand: micro-batch i = rows i::2 with key fold_in(k_step, i), gradients averaged
    k_label, k_step = jax.random.split(jax.random.fold_in(state.rng, state.step))
    label = jnp.asarray(batch["label"], jnp.float32)
    inputs = {k: v for k, v in batch.items() if k in schema.MODEL_INPUT_FIELDS}
    micro = jax.value_and_grad(s.step_fn.keywords["loss_fn"], has_aux=True)
    outs = [
        micro(
            state.params,
            state.ref_params,
            jax.tree.map(lambda x, i=i: x[i::2], inputs),
            label[i::2],
            jax.random.fold_in(k_step, i),
            consts,
        )
        for i in range(2)
    ]
    grads = jax.tree.map(lambda a, b: (a + b) / 2, outs[0][1], outs[1][1])
    updates, _ = s.tx.update(grads, state.opt_state, state.params)
    expect = optax.apply_updates(state.params, updates)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expect), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    loss = (float(outs[0][0][0]) + float(outs[1][0][0])) / 2
    assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)
    assert int(new_state.step) == 1


def test_sample_latents_formula():
    key = jax.random.PRNGKey(3)
    m = np.random.default_rng(0).standard_normal((2, 2, 4, 3, 3)).astype(np.float16)
    m[:, 1] = -40  # below diffusers' clamp of -30
    got = ts.sample_latents(jnp.asarray(m), key, 0.5)
    n = np.asarray(jax.random.normal(key, (2, 4, 3, 3)), np.float64)
    want = (m[:, 0].astype(np.float64) + np.exp(0.5 * -30.0) * n) * 0.5
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_refresh_and_ema_reference():
    state = _probe_setup().state
    fresh = ts.refresh_reference(state)
    for p, r in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(fresh.ref_params), strict=True):
        np.testing.assert_array_equal(p, r)
    ema = ts.ema_reference(state, 0.9)
    for p, r0, r in zip(
        jax.tree.leaves(state.params),
        jax.tree.leaves(state.ref_params),
        jax.tree.leaves(ema.ref_params),
        strict=True,
    ):
        np.testing.assert_allclose(r, 0.9 * np.asarray(r0) + 0.1 * np.asarray(p), rtol=1e-6)


# --- the real tiny UNet ----------------------------------------------------------------------


class _Tiny(NamedTuple):
    step: Callable  # jitted like the trainer's, state donated
    refresh: Callable
    shardings: train_state.TrainState
    consts: dict
    state0: train_state.TrainState  # on the host
    batch: dict


@pytest.fixture(scope="module")
def tiny_unet() -> _Tiny:
    """The trainer's own step, refresh and initial state for configs/tiny.py on one device (the
    8-device FSDP step of the same model is tests/test_sharding.py's job)."""
    config = tiny.get_config()
    config.dpo.proportion_empty_prompts = 0.0
    ds, info = data.make_dataset(config.data, global_batch_size=8, seed=0, label_mode="majority")
    batch = {k: v for k, v in next(iter(ds)).items() if k != "index"}
    model, _, _ = train_state.build_model(
        config.model, latent_shape=info.latent_shape, text_shape=info.text_shape, pooled_dim=None
    )
    step_fn, tx, consts = train.make_train_step(config, info, model)
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    inits = train_state.make_initializers(model, tx, mesh, (), int(config.mesh.fsdp_min_size))
    state0 = jax.device_get(inits.init_random(jax.random.PRNGKey(0)))
    return _Tiny(
        train.jit_train_step(step_fn, inits.shardings, mesh),
        train.jit_refresh(config.dpo, inits.shardings),
        inits.shardings,
        jax.device_put(consts, sharding.replicated(mesh)),
        state0,
        sharding.to_global_batch(batch, sharding.batch_sharding(mesh)),
    )


def _place(tiny_unet: _Tiny) -> train_state.TrainState:
    return jax.device_put(tiny_unet.state0, tiny_unet.shardings)


def test_first_step_loss_is_log2(tiny_unet):
    """Policy == reference: loss log 2. (XLA compiles the policy forward, which keeps residuals
    for the backward, differently from the reference forward: the two mse differ by ~1 ulp,
    amplified by beta / 2 = 250, so the step-0 implicit accuracy is rounding noise here.)"""
    t = tiny_unet
    _, metrics = t.step(_place(t), t.batch, t.consts)
    assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-4)
    assert float(metrics["model_diff"]) == pytest.approx(float(metrics["ref_diff"]), abs=1e-6)
    assert float(metrics["model_mse"]) == pytest.approx(float(metrics["ref_mse"]), rel=1e-6)


def test_overfits_a_fixed_batch(tiny_unet):
    t = tiny_unet
    state = _place(t)
    losses, accs = [], []
    for _ in range(20):
        state, metrics = t.step(state, t.batch, t.consts)
        losses.append(float(metrics["loss"]))
        accs.append(float(metrics["implicit_accuracy"]))
    assert np.mean(losses[-5:]) < losses[0] - 0.1, losses
    assert np.mean(accs[-5:]) > 0.6, accs


def test_reference_refresh_schedule(tiny_unet):
    t = tiny_unet
    state = _place(t)

    def same(s):
        return all(
            np.array_equal(p, r)
            for p, r in zip(jax.tree.leaves(s.params), jax.tree.leaves(s.ref_params), strict=True)
        )

    state, metrics = t.step(state, t.batch, t.consts)
    assert float(metrics["lr"]) == 0.0 and same(state)  # warm-up starts at lr 0, like diffusers
    state, _ = t.step(state, t.batch, t.consts)
    assert not same(state)  # the policy moved, the reference did not
    state = t.refresh(state)
    assert same(state)
    state, _ = t.step(state, t.batch, t.consts)
    assert not same(state)  # refreshed reference is a copy, not an alias of the params


# --- the DPO signal at policy == reference (config.dpo.matched_forward) --------------------


def test_matched_forward_makes_inside_exactly_zero_at_policy_equals_reference():
    """bf16, remat, policy == reference: with config.dpo.matched_forward the policy's and the
    reference's mse come from one forward program, so inside is exactly 0 and the step-0
    implicit accuracy 0; the gradient is the plain recipe's (straight-through).

    On this CPU the tiny model does not show the bf16 problem without the fix either (the
    grad-path forward rounds like the reference forward here; bench/dpo_signal.py measures the
    full SD1.5), so the property tested is the bit-identical value path, not a failure
    without it."""
    config = tiny.get_config()
    config.model.compute_dtype = "bfloat16"
    config.model.remat = True
    config.dpo.beta = 5000.0
    ds, info = data.make_dataset(config.data, global_batch_size=8, seed=0, label_mode="majority")
    batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items() if k in schema.MODEL_INPUT_FIELDS}
    label = jnp.asarray(np.where(np.arange(8) % 2 == 0, 1.0, -1.0), jnp.float32)
    model, _, _ = train_state.build_model(
        config.model, latent_shape=info.latent_shape, text_shape=info.text_shape, pooled_dim=None
    )
    _, _, consts = train.make_train_step(config, info, model)
    consts = jax.tree.map(jnp.asarray, consts)
    inits = train_state.make_initializers(
        model, optax.sgd(0.0), sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    )
    params = inits.init_random(jax.random.PRNGKey(0)).params
    key = jax.random.PRNGKey(3)
    outs = {}
    for matched in (True, False):
        loss_fn = train.make_train_step(config, info, model)[0].keywords["loss_fn"]
        loss_fn = functools.partial(
            loss_fn.func, **{**loss_fn.keywords, "matched_forward": matched}
        )
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        outs[matched] = grad_fn(params, params, batch, label, key, consts)
    (loss, metrics), grads = outs[True]
    assert float(metrics["abs_inside_median"]) == 0.0
    assert float(metrics["implicit_accuracy"]) == 0.0
    assert float(metrics["model_mse"]) == float(metrics["ref_mse"])  # bit-identical
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
    (_, plain_metrics), plain_grads = outs[False]
    assert float(plain_metrics["model_mse"]) == pytest.approx(float(metrics["model_mse"]), 1e-5)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-7)
