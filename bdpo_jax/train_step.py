"""One Diffusion-DPO optimiser step as a pure function, and the reference refresh.

Follows the authors' train.py (SalesforceAIResearch/DiffusionDPO) per pair:
latents sampled from the stored VAE moments, ONE noise and ONE timestep shared by both
images, the policy on the 2B batch [image 1; image 2] in one UNet call and the reference in
another (no gradient), per-image mse over C, H, W against the epsilon or v target, then
`loss.dpo_loss` (beta applied once). `sft_loss_fn` is the SFT baseline: one UNet call on the
B winners. The caller picks the loss function and the label function (`labels.make_label_fn`)
once and binds them with functools.partial (see bdpo_jax.train):

    step = jax.jit(functools.partial(train_step, loss_fn=..., label_fn=..., tx=..., ...))

Gradient accumulation is a `lax.scan` over micro-batches: one call = one optimiser step. The
per-step key is fold_in(state.rng, state.step), so a resumed run draws the same noise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdpo_jax import labels as labels_lib
from bdpo_jax import lora as lora_lib
from bdpo_jax import loss as loss_lib
from bdpo_jax import schedules
from bdpo_jax.schema import MODEL_INPUT_FIELDS
from bdpo_jax.train_state import Params, TrainState

_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0  # diffusers DiagonalGaussianDistribution clamp
REF_UPDATES = ("copy", "ema")  # config.dpo.ref_update

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# (params, ref_params, micro-batch, label, rng, consts) -> (loss, metrics)
LossFn = Callable[[Params, Params, Batch, jax.Array, jax.Array, Batch], tuple[jax.Array, Metrics]]


def make_consts(
    *,
    beta: float,
    weights_K: np.ndarray,
    score_std_K: np.ndarray,
    empty_text_embeds: np.ndarray,
    empty_pooled_text_embeds: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """The step's runtime inputs besides state and batch (host arrays; the caller places them
    replicated).

    beta [], weights_K [K] (`labels.label_weights`), score_std_K [K] (dataset stats),
    empty_text_embeds [L, D] and, for SDXL, empty_pooled_text_embeds [P] (prompt dropout).
    """
    consts = {
        "beta": np.float32(beta),
        "weights_K": np.asarray(weights_K, np.float32),
        "score_std_K": np.asarray(score_std_K, np.float32),
        "empty_text_embeds": np.asarray(empty_text_embeds, np.float32),
    }
    if empty_pooled_text_embeds is not None:
        consts["empty_pooled_text_embeds"] = np.asarray(empty_pooled_text_embeds, np.float32)
    return consts


def sample_latents(moments_Bx2xCxHxW: jax.Array, rng: jax.Array, scaling: float) -> jax.Array:
    """(mean + exp(0.5 * logvar) * n) * scaling, like latent_dist.sample() * scaling_factor."""
    moments = moments_Bx2xCxHxW.astype(jnp.float32)
    mean_BxCxHxW = moments[:, 0]
    logvar_BxCxHxW = jnp.clip(moments[:, 1], _LOGVAR_MIN, _LOGVAR_MAX)
    n_BxCxHxW = jax.random.normal(rng, mean_BxCxHxW.shape, jnp.float32)
    return (mean_BxCxHxW + jnp.exp(0.5 * logvar_BxCxHxW) * n_BxCxHxW) * scaling


def _noised_pairs(
    mb: Batch,
    rng: jax.Array,
    consts: Batch,
    *,
    schedule: schedules.Schedule,
    vae_scaling_factor: float,
    proportion_empty_prompts: float,
    timestep_probabilities_T: np.ndarray | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, Batch | None]:
    """Both images' latents, the pair's shared noise and timestep (uniform, or drawn with
    `timestep_probabilities_T`), and its (dropped) prompt."""
    b = mb["moments_0"].shape[0]
    k_x1, k_x2, k_eps, k_t, k_drop = jax.random.split(rng, 5)
    x0_1 = sample_latents(mb["moments_0"], k_x1, vae_scaling_factor)
    x0_2 = sample_latents(mb["moments_1"], k_x2, vae_scaling_factor)
    eps_BxCxHxW = jax.random.normal(k_eps, x0_1.shape, jnp.float32)
    t_B = schedules.sample_timesteps(k_t, b, schedule.num_train_timesteps, timestep_probabilities_T)

    drop_B = jax.random.uniform(k_drop, (b,)) < proportion_empty_prompts  # per pair
    text_BxLxD = jnp.where(
        drop_B[:, None, None], consts["empty_text_embeds"][None], mb["text_embeds"]
    ).astype(jnp.float32)
    added_B = None
    if "pooled_text_embeds" in mb:  # SDXL: pooled embedding dropped with the text
        pooled_BxP = jnp.where(
            drop_B[:, None], consts["empty_pooled_text_embeds"][None], mb["pooled_text_embeds"]
        ).astype(jnp.float32)
        added_B = {"text_embeds": pooled_BxP, "time_ids": mb["add_time_ids"].astype(jnp.float32)}
    return x0_1, x0_2, eps_BxCxHxW, t_B, text_BxLxD, added_B


def _mse_fn(
    model: nn.Module,
    schedule: schedules.Schedule,
    prediction_type: str,
    x0_NxCxHxW: jax.Array,
    eps_BxCxHxW: jax.Array,
    t_B: jax.Array,
    text_BxLxD: jax.Array,
    added_B: Batch | None,
    loss_type: str = "l2",
    huber_c: float = 0.1,
) -> Callable[[Params], jax.Array]:
    """params -> per-image mse [N] of the N = copies * B images x0_N (the pair's noise, timestep
    and prompt repeated for each copy); another per-element error with `loss_type` (SFT only,
    `loss.per_image_error`)."""
    copies = x0_NxCxHxW.shape[0] // eps_BxCxHxW.shape[0]

    def per_image(x_B):
        return jnp.concatenate([x_B] * copies)

    eps_N, t_N, text_N = per_image(eps_BxCxHxW), per_image(t_B), per_image(text_BxLxD)
    added_N = None if added_B is None else jax.tree.map(per_image, added_B)
    xt_N = schedules.add_noise(schedule, x0_NxCxHxW, eps_N, t_N)
    target_N = schedules.training_target(schedule, x0_NxCxHxW, eps_N, t_N, prediction_type)

    def mse(params: Params) -> jax.Array:
        pred = model.apply({"params": params}, xt_N, t_N, text_N, added_cond_kwargs=added_N)
        return loss_lib.per_image_error(pred, target_N, loss_type, huber_c)

    return mse


def _forward_only_mse(
    mse: Callable[[Params], jax.Array], params: Params, ref_params: Params
) -> tuple[jax.Array, jax.Array]:
    """(mse(params), mse(ref_params)) from ONE forward program run twice (a 2-step scan whose
    body selects its parameters), so both are computed by the very same XLA ops and are
    bit-identical when params == ref_params. No gradient flows (inputs are stop_gradient'ed)."""
    params, ref_params = jax.lax.stop_gradient((params, ref_params))

    def body(carry, is_ref):
        theta = jax.tree.map(lambda p, r: jnp.where(is_ref, r, p), params, ref_params)
        return carry, mse(theta)

    _, out_2xN = jax.lax.scan(body, None, jnp.array([False, True]))
    return out_2xN[0], out_2xN[1]


def dpo_mse(
    params: Params,
    ref_params: Params,
    mb: Batch,
    rng: jax.Array,
    consts: Batch,
    *,
    model: nn.Module,
    schedule: schedules.Schedule,
    prediction_type: str,
    vae_scaling_factor: float,
    proportion_empty_prompts: float,
    matched_forward: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Per-image mse of the policy (differentiable) and of the reference (no gradient), [2B]
    each: [image 1 of every pair; image 2 of every pair].

    matched_forward (config.dpo.matched_forward): the policy's VALUE comes from the same
    forward-only program as the reference's (`_forward_only_mse`), its GRADIENT from the
    policy's own forward inside value_and_grad, by straight-through:
    err = err_fwd + (err_grad - stop_gradient(err_grad)) (value exactly err_fwd). At policy ==
    reference (step 0, after every refresh) the DPO `inside` is then exactly 0, not bf16
    rounding noise times beta / 2. Costs one extra forward of the 2B batch. False: the value of
    the gradient pass (the authors' code).
    """
    x0_1, x0_2, eps_B, t_B, text_B, added_B = _noised_pairs(
        mb,
        rng,
        consts,
        schedule=schedule,
        vae_scaling_factor=vae_scaling_factor,
        proportion_empty_prompts=proportion_empty_prompts,
    )
    x0_2B = jnp.concatenate([x0_1, x0_2])
    mse = _mse_fn(model, schedule, prediction_type, x0_2B, eps_B, t_B, text_B, added_B)
    err_2B = mse(params)
    if not matched_forward:
        return err_2B, jax.lax.stop_gradient(mse(ref_params))
    value_2B, ref_2B = _forward_only_mse(mse, params, ref_params)
    return value_2B + (err_2B - jax.lax.stop_gradient(err_2B)), ref_2B


def dpo_loss_fn(
    params: Params,
    ref_params: Params,
    mb: Batch,
    label: jax.Array,
    rng: jax.Array,
    consts: Batch,
    *,
    model: nn.Module,
    schedule: schedules.Schedule,
    prediction_type: str,
    vae_scaling_factor: float,
    proportion_empty_prompts: float,
    matched_forward: bool = False,
) -> tuple[jax.Array, Metrics]:
    """Diffusion-DPO loss and metrics of one micro-batch: both images of each pair in one call,
    [image 1 of every pair; image 2 of every pair], the reference in another (no gradient);
    see `dpo_mse` for matched_forward.

    A [B, K] label (mode 'weighted_sum') is weighted by consts["weights_K"] (Eq. 10).
    """
    err_2B, ref_2B = dpo_mse(
        params,
        ref_params,
        mb,
        rng,
        consts,
        model=model,
        schedule=schedule,
        prediction_type=prediction_type,
        vae_scaling_factor=vae_scaling_factor,
        proportion_empty_prompts=proportion_empty_prompts,
        matched_forward=matched_forward,
    )
    b = err_2B.shape[0] // 2
    return loss_lib.dpo_loss(
        err_2B[:b],
        err_2B[b:],
        ref_2B[:b],
        ref_2B[b:],
        label,
        consts["beta"],
        weights_K=consts["weights_K"] if label.ndim == 2 else None,
    )


def sft_loss_fn(
    params: Params,
    ref_params: Params,
    mb: Batch,
    label: jax.Array,
    rng: jax.Array,
    consts: Batch,
    *,
    model: nn.Module,
    schedule: schedules.Schedule,
    prediction_type: str,
    vae_scaling_factor: float,
    proportion_empty_prompts: float,
    snr_gamma: float = 0.0,
    snr_weighting: str = "min_snr",
    timestep_probabilities_T: np.ndarray | None = None,
    loss_type: str = "l2",
    huber_c: float = 0.1,
) -> tuple[jax.Array, Metrics]:
    """Plain SFT on the winners (label = the winner's index), as Diffusion-DPO's --sft loads only
    winners: one UNet call on the B winners with their pair's noise and timestep. The
    reference is not used. snr_gamma > 0: each image's mse weighted by
    `schedules.snr_loss_weights` (`snr_weighting`: Min-SNR-gamma or truncated SNR); 0: the plain
    mean (the authors'). timestep_probabilities_T: the timesteps' distribution
    (`schedules.timestep_probabilities`; None: uniform, the authors'). loss_type, huber_c: the
    per-element error (`loss.per_image_error`; 'l2', the authors', is the mse)."""
    del ref_params
    x0_1, x0_2, eps_B, t_B, text_B, added_B = _noised_pairs(
        mb,
        rng,
        consts,
        schedule=schedule,
        vae_scaling_factor=vae_scaling_factor,
        proportion_empty_prompts=proportion_empty_prompts,
        timestep_probabilities_T=timestep_probabilities_T,
    )
    x0_w = jnp.where((label == 0)[:, None, None, None], x0_1, x0_2)
    mse_w_B = _mse_fn(
        model, schedule, prediction_type, x0_w, eps_B, t_B, text_B, added_B, loss_type, huber_c
    )(params)
    weights_B = (
        schedules.snr_loss_weights(schedule, t_B, snr_gamma, prediction_type, snr_weighting)
        if snr_gamma > 0
        else None
    )
    return loss_lib.sft_loss(mse_w_B, weights_B), {"model_mse": mse_w_B.mean()}


def make_loss_fn(
    kind: str,
    model: nn.Module,
    schedule: schedules.Schedule,
    *,
    prediction_type: str,
    vae_scaling_factor: float,
    proportion_empty_prompts: float,
    matched_forward: bool = False,
    snr_gamma: float = 0.0,
    snr_weighting: str = "min_snr",
    timestep_probabilities_T: np.ndarray | None = None,
    loss_type: str = "l2",
    huber_c: float = 0.1,
) -> LossFn:
    """`dpo_loss_fn` or `sft_loss_fn` (kind 'dpo' | 'sft') with the model and knobs bound
    (matched_forward: DPO only, see `dpo_mse`; snr_gamma, snr_weighting,
    timestep_probabilities_T, loss_type, huber_c: SFT only, see `sft_loss_fn`)."""
    fns = {"dpo": dpo_loss_fn, "sft": sft_loss_fn}
    if kind not in fns:
        raise ValueError(f"loss kind {kind!r}: expected one of {sorted(fns)}")
    if kind == "dpo" and snr_gamma:
        raise ValueError(f"snr_gamma={snr_gamma}: the DPO loss is unweighted (SFT only)")
    if kind == "dpo" and timestep_probabilities_T is not None:
        raise ValueError("timestep_probabilities_T: DPO trains on uniform timesteps (SFT only)")
    if kind == "dpo" and loss_type != "l2":
        raise ValueError(f"loss_type={loss_type!r}: the DPO loss compares mse (SFT only)")
    extra = (
        {"matched_forward": bool(matched_forward)}
        if kind == "dpo"
        else {
            "snr_gamma": float(snr_gamma),
            "snr_weighting": str(snr_weighting),
            "timestep_probabilities_T": timestep_probabilities_T,
            "loss_type": str(loss_type),
            "huber_c": float(huber_c),
        }
    )
    return functools.partial(
        fns[kind],
        **extra,
        model=model,
        schedule=schedule,
        prediction_type=prediction_type,
        vae_scaling_factor=float(vae_scaling_factor),
        proportion_empty_prompts=float(proportion_empty_prompts),
    )


def _label_stats(label: jax.Array, batch: Batch) -> Metrics:
    """Agreement of a [B] preference label with the human label (where there is one).

    Not for SFT's winner index (int32) nor weighted_sum's per-scorer [B, K] label.
    """
    if label.ndim != 1 or not jnp.issubdtype(label.dtype, jnp.floating):
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
    batch: Batch,
    consts: Batch,
    base: Params | None = None,
    *,
    loss_fn: LossFn,
    label_fn: labels_lib.LabelFn,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    lora: lora_lib.LoraSpec | None = None,
    ref_is_base: bool = False,
    base_shardings: Params | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimiser step: labels, loss, gradient (accumulated), clip, update; scalar metrics.

    consts: see `make_consts`. loss_fn: `make_loss_fn`. label_fn: `labels.make_label_fn`.
    LoRA (`lora` set): state.params / ref_params are adapters of the frozen `base` params; the
    loss sees base + adapters merged (`lora.merge`), the gradient is the adapters' only; with
    `ref_is_base` (no reference refresh) the reference is the base alone. `base_shardings`
    (the base's NamedShardings) lay the merged kernels out as the base's.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    k_label, k_step = jax.random.split(rng)
    label = label_fn(batch, consts["weights_K"], consts["score_std_K"], k_label)
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_FIELDS}
    if lora is None:
        policy, ref_params = (lambda p: p), state.ref_params
    else:

        def policy(adapters):
            return lora_lib.merge(base, adapters, lora.scale, base_shardings)

        ref_params = base if ref_is_base else policy(state.ref_params)

    def grad_fn(mb, mb_label, key):
        def loss_of(params):
            return loss_fn(policy(params), ref_params, mb, mb_label, key, consts)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        return grads, {**metrics, "loss": loss}

    a = grad_accum_steps
    if a == 1:
        grads, metrics = grad_fn(inputs, label, k_step)
    else:

        def split(x):  # micro-batch i = rows i, i + a, ...: every micro-batch spans all devices
            return x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1)

        def body(grad_sum, xs):
            mb, mb_label, i = xs
            g, m = grad_fn(mb, mb_label, jax.random.fold_in(k_step, i))
            return jax.tree.map(jnp.add, grad_sum, g), m

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        xs = (jax.tree.map(split, inputs), split(label), jnp.arange(a))
        grads, metrics = jax.lax.scan(body, zeros, xs)
        grads = jax.tree.map(lambda g: g / a, grads)
        metrics = jax.tree.map(lambda m: m.mean(axis=0), metrics)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **metrics,
        **_label_stats(label, batch),
        "grad_norm": optax.global_norm(grads),
        "lr": lr_schedule(state.step),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def refresh_reference(state: TrainState) -> TrainState:
    """Alg. 1 line 14: p_ref <- p_theta (a tree copy)."""
    return state.replace(ref_params=jax.tree.map(jnp.copy, state.params))


def ema_reference(state: TrainState, decay: float) -> TrainState:
    """p_ref <- decay * p_ref + (1 - decay) * p_theta."""
    ref = jax.tree.map(lambda r, p: decay * r + (1.0 - decay) * p, state.ref_params, state.params)
    return state.replace(ref_params=ref)
