"""One Diffusion-DPO optimiser step as a pure function, and the reference refresh.

Follows the authors' train.py (SalesforceAIResearch/DiffusionDPO) per pair:
latents sampled from the stored VAE moments, ONE noise and ONE timestep shared by both
images, the policy on the 2B batch [image 1; image 2] in one UNet call and the reference in
another (no gradient), per-image mse over C, H, W against the epsilon or v target, then
`loss.dpo_loss` (beta applied once). Labels come from `labels.label_for_batch` (the mode is
static). Gradient accumulation is a `lax.scan` over micro-batches: one call = one optimiser
step. The per-step key is fold_in(state.rng, state.step), so a resumed run draws the same noise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bdpo_jax import labels as labels_lib
from bdpo_jax import loss as loss_lib
from bdpo_jax import optim, schedules, sharding, train_state
from bdpo_jax.train_state import TrainState

_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0  # diffusers DiagonalGaussianDistribution clamp


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about the step (hashable: it keys the compile cache).

    Values that do not change the computation are normalised (total_steps only matters for a
    cosine schedule, global_batch_size only with scale_lr) so equal programs share a compile.
    beta and the dataset's score stats are runtime inputs (`consts`), not compile keys.
    """

    prediction_type: str
    label_mode: str
    scorer_names: tuple[str, ...]
    scorer: str
    weights: tuple[float, ...] | None
    smpo_lo: float
    smpo_hi: float
    smpo_scale: float
    proportion_empty_prompts: float
    vae_scaling_factor: float
    grad_accum_steps: int
    schedule: tuple[tuple[str, Any], ...]  # make_schedule kwargs
    optim: tuple[tuple[str, Any], ...]  # config.optim items
    global_batch_size: int
    total_steps: int

    def optimizer(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
        optim_config = ml_collections.ConfigDict(dict(self.optim))
        return optim.make_optimizer(optim_config, self.global_batch_size, self.total_steps)

    def make_schedule(self) -> Any:
        return schedules.make_schedule(**dict(self.schedule))


def make_step_config(config: ml_collections.ConfigDict, info: Any) -> StepConfig:
    """The StepConfig of a run from its config and DatasetInfo (validates the label config)."""
    labels_lib.check_label_config(config.label, info.scorer_names)
    weights = None
    if config.label.mode in labels_lib.WEIGHTED_MODES:
        weights = tuple(
            float(w) for w in labels_lib.parse_weights(config.label.weights, info.scorer_names)
        )
    label = config.label
    return StepConfig(
        prediction_type=config.model.prediction_type,
        label_mode=label.mode,
        scorer_names=tuple(info.scorer_names),
        scorer=label.scorer,
        weights=weights,
        smpo_lo=float(label.get("smpo_lo", 0.11544)),
        smpo_hi=float(label.get("smpo_hi", 0.28202)),
        smpo_scale=float(label.get("smpo_scale", 10.0)),
        proportion_empty_prompts=float(config.dpo.proportion_empty_prompts),
        vae_scaling_factor=float(info.vae_scaling_factor),
        grad_accum_steps=int(config.optim.grad_accum_steps),
        schedule=(
            ("num_train_timesteps", int(config.diffusion.num_train_timesteps)),
            ("beta_schedule", config.diffusion.beta_schedule),
            ("beta_start", float(config.diffusion.beta_start)),
            ("beta_end", float(config.diffusion.beta_end)),
        ),
        optim=tuple(sorted(config.optim.to_dict().items())),
        global_batch_size=int(config.train.global_batch_size) if config.optim.scale_lr else 1,
        total_steps=int(config.train.steps) if config.optim.schedule == "cosine" else 0,
    )


def make_consts(info: Any, cfg: StepConfig, beta: float, mesh: Any) -> dict[str, jax.Array]:
    """The step's runtime inputs besides state and batch, replicated over `mesh`."""
    consts: dict[str, Any] = {
        "beta": np.float32(beta),
        "empty_text_embeds": np.asarray(info.empty_text_embeds, np.float32),
        "score_std_K": np.asarray(info.score_std, np.float32),
    }
    if info.pooled_dim:
        consts["empty_pooled_text_embeds"] = np.asarray(info.empty_pooled_text_embeds, np.float32)
    if cfg.weights is not None:
        consts["weights_K"] = np.asarray(cfg.weights, np.float32)
    if cfg.label_mode == "single":  # a runtime input: single-scorer runs share a compile
        consts["scorer_onehot_K"] = labels_lib.scorer_onehot(cfg.scorer_names, cfg.scorer)
    return jax.device_put(consts, sharding.replicated(mesh))


def sample_latents(moments_Bx2xCxHxW: jax.Array, rng: jax.Array, scaling: float) -> jax.Array:
    """(mean + exp(0.5 * logvar) * n) * scaling, like latent_dist.sample() * scaling_factor."""
    moments = moments_Bx2xCxHxW.astype(jnp.float32)
    mean_BxCxHxW = moments[:, 0]
    logvar_BxCxHxW = jnp.clip(moments[:, 1], _LOGVAR_MIN, _LOGVAR_MAX)
    n_BxCxHxW = jax.random.normal(rng, mean_BxCxHxW.shape, jnp.float32)
    return (mean_BxCxHxW + jnp.exp(0.5 * logvar_BxCxHxW) * n_BxCxHxW) * scaling


def _per_image_mse(model, params, xt_NxCxHxW, t_N, text_NxLxD, added, target_NxCxHxW):
    pred = model.apply({"params": params}, xt_NxCxHxW, t_N, text_NxLxD, added_cond_kwargs=added)
    err = (pred.astype(jnp.float32) - target_NxCxHxW) ** 2
    return err.mean(axis=(1, 2, 3))


def _micro_step(params, ref_params, mb, label, rng, consts, *, model, schedule, cfg: StepConfig):
    """Loss, metrics and gradient of one micro-batch."""
    b = mb["moments_0"].shape[0]
    k_x1, k_x2, k_eps, k_t, k_drop = jax.random.split(rng, 5)
    x0_1 = sample_latents(mb["moments_0"], k_x1, cfg.vae_scaling_factor)
    x0_2 = sample_latents(mb["moments_1"], k_x2, cfg.vae_scaling_factor)
    eps_BxCxHxW = jax.random.normal(k_eps, x0_1.shape, jnp.float32)
    t_B = schedules.sample_timesteps(k_t, b, schedule_num_steps(cfg))

    drop_B = jax.random.uniform(k_drop, (b,)) < cfg.proportion_empty_prompts  # per pair
    text_BxLxD = jnp.where(
        drop_B[:, None, None], consts["empty_text_embeds"][None], mb["text_embeds"]
    ).astype(jnp.float32)
    added_B = None
    if "pooled_text_embeds" in mb:  # SDXL: pooled embedding dropped with the text
        pooled_BxP = jnp.where(
            drop_B[:, None], consts["empty_pooled_text_embeds"][None], mb["pooled_text_embeds"]
        ).astype(jnp.float32)
        added_B = {"text_embeds": pooled_BxP, "time_ids": mb["add_time_ids"].astype(jnp.float32)}

    if cfg.label_mode == "sft":
        # only the winner (label = its index) is trained on, as Diffusion-DPO's --sft loads only
        # winners: one UNet call on the B winners with their pair's noise and timestep
        x0_N = jnp.where((label == 0)[:, None, None, None], x0_1, x0_2)
        copies = 1
    else:  # both images of each pair in one call: [image 1 of every pair; image 2 of every pair]
        x0_N = jnp.concatenate([x0_1, x0_2])
        copies = 2

    def per_image(x_B):  # the pair's value for each of the N = copies * B images
        return jnp.concatenate([x_B] * copies)

    eps_N, t_N = per_image(eps_BxCxHxW), per_image(t_B)
    mse = functools.partial(
        _per_image_mse,
        model,
        xt_NxCxHxW=schedules.add_noise(schedule, x0_N, eps_N, t_N),
        t_N=t_N,
        text_NxLxD=per_image(text_BxLxD),
        added=None if added_B is None else jax.tree.map(per_image, added_B),
        target_NxCxHxW=schedules.training_target(schedule, x0_N, eps_N, t_N, cfg.prediction_type),
    )

    if cfg.label_mode == "sft":

        def loss_fn(p):
            mse_w_B = mse(p)
            return loss_lib.sft_loss(mse_w_B), {"model_mse": mse_w_B.mean()}
    else:
        ref_2B = jax.lax.stop_gradient(mse(ref_params))

        def loss_fn(p):
            err_2B = mse(p)
            return loss_lib.dpo_loss(
                err_2B[:b],
                err_2B[b:],
                ref_2B[:b],
                ref_2B[b:],
                label,
                consts["beta"],
                weights_K=consts["weights_K"] if cfg.label_mode == "weighted_sum" else None,
            )

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, {**metrics, "loss": loss}


def schedule_num_steps(cfg: StepConfig) -> int:
    return int(dict(cfg.schedule)["num_train_timesteps"])


def _label_stats(label: jax.Array, batch: dict, mode: str) -> dict[str, jax.Array]:
    """Batch label statistics: agreement with the human label (where there is one)."""
    if mode == "sft" or label.ndim != 1:
        return {}
    human = batch["human_label"].astype(jnp.float32)
    has_human = jnp.isfinite(human) & (human != 0) & (label != 0)
    agree = (jnp.sign(label) == jnp.sign(human)) & has_human
    return {
        "label_mean": label.astype(jnp.float32).mean(),
        "label_human_agreement": agree.sum() / jnp.maximum(has_human.sum(), 1),
    }


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    consts: dict[str, jax.Array],
    *,
    model: Any,
    schedule: Any,
    static_cfg: StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step: labels, loss, gradient (accumulated), clip, update; scalar metrics.

    consts: {"beta" [], "empty_text_embeds" [L, D], "empty_pooled_text_embeds" [P] (SDXL),
    "weights_K" [K] (label modes with scorer weights), "score_std_K" [K] (dataset stats)}.
    """
    cfg = static_cfg
    rng = jax.random.fold_in(state.rng, state.step)
    k_label, k_step = jax.random.split(rng)
    label = labels_lib.label_for_batch(
        cfg.label_mode,
        batch,
        scorer_names=cfg.scorer_names,
        scorer=cfg.scorer,
        weights=consts.get("weights_K"),
        score_std=consts.get("score_std_K"),
        rng=k_label,
        scorer_onehot=consts.get("scorer_onehot_K"),
        smpo_lo=cfg.smpo_lo,
        smpo_hi=cfg.smpo_hi,
        smpo_scale=cfg.smpo_scale,
    )
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    micro = functools.partial(_micro_step, model=model, schedule=schedule, cfg=cfg)
    a = cfg.grad_accum_steps
    if a == 1:
        grads, metrics = micro(state.params, state.ref_params, inputs, label, k_step, consts)
    else:

        def split(x):  # micro-batch i = rows i, i + a, ...: every micro-batch spans all devices
            return x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1)

        def body(grad_sum, xs):
            mb, mb_label, i = xs
            g, m = micro(
                state.params, state.ref_params, mb, mb_label, jax.random.fold_in(k_step, i), consts
            )
            return jax.tree.map(jnp.add, grad_sum, g), m

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        xs = (jax.tree.map(split, inputs), split(label), jnp.arange(a))
        grads, metrics = jax.lax.scan(body, zeros, xs)
        grads = jax.tree.map(lambda g: g / a, grads)
        metrics = jax.tree.map(lambda m: m.mean(axis=0), metrics)

    tx, lr_schedule = cfg.optimizer()
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **metrics,
        **_label_stats(label, batch, cfg.label_mode),
        "grad_norm": optax.global_norm(grads),
        "lr": lr_schedule(state.step),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


_MODEL_INPUTS = ("moments_0", "moments_1", "text_embeds", "pooled_text_embeds", "add_time_ids")


def refresh_reference(state: TrainState) -> TrainState:
    """Alg. 1 line 14: p_ref <- p_theta (a tree copy)."""
    return state.replace(ref_params=jax.tree.map(jnp.copy, state.params))


def ema_reference(state: TrainState, decay: float) -> TrainState:
    """p_ref <- decay * p_ref + (1 - decay) * p_theta."""
    ref = jax.tree.map(lambda r, p: decay * r + (1.0 - decay) * p, state.ref_params, state.params)
    return state.replace(ref_params=ref)


class StepFunctions(NamedTuple):
    """Jitted, sharded functions of one (model, step config, mesh)."""

    train_step: Any  # (state, batch, consts) -> (state, metrics); state donated
    refresh: Any  # state -> state (reference refresh, copy or EMA); state donated
    shardings: TrainState  # NamedSharding of every state leaf
    batch_sharding: Any
    inits: train_state.Initializers  # abstract state and jitted sharded initialisers


@functools.lru_cache(maxsize=8)
def make_step_functions(
    model: Any,
    cfg: StepConfig,
    mesh: Any,
    rules: tuple,
    min_size: int,
    ref_update: str = "copy",
    ref_ema_decay: float = 0.99,
) -> StepFunctions:
    """Compile-once (cached) jitted step and refresh with explicit in/out shardings."""
    tx, _ = cfg.optimizer()
    inits = train_state.make_initializers(model, tx, mesh, rules, min_size)
    shardings = inits.shardings
    batch_sh = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)
    schedule = cfg.make_schedule()
    step = jax.jit(
        functools.partial(train_step, model=model, schedule=schedule, static_cfg=cfg),
        in_shardings=(shardings, batch_sh, repl),
        out_shardings=(shardings, repl),
        donate_argnums=(0,),
    )
    if ref_update == "copy":
        refresh_fn = refresh_reference
    elif ref_update == "ema":
        refresh_fn = functools.partial(ema_reference, decay=ref_ema_decay)
    else:
        raise ValueError(f"config.dpo.ref_update={ref_update!r}: expected 'copy' or 'ema'")
    refresh = jax.jit(
        refresh_fn, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=(0,)
    )
    return StepFunctions(step, refresh, shardings, batch_sh, inits)
