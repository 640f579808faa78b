"""The Diffusion-DPO loss exactly as its authors coded it, with BalancedDPO's label.

Pure jnp. Follows SalesforceAIResearch/DiffusionDPO train.py (the `sft`/`dpo` branches):

    model_diff = mse_theta(x1) - mse_theta(x2)          (image 1 minus image 2, stored order)
    ref_diff   = mse_ref(x1)   - mse_ref(x2)
    inside     = -0.5 * beta * label * (model_diff - ref_diff)     (beta applied ONCE)
    loss       = mean_B(-log_sigmoid(inside))

label = +1 (image 1 wins), -1 (image 2 wins), 0 (tie: constant loss log 2, zero gradient),
or any real multiplier (soft vote share in [-1, 1], SmPO's (2p - 1) * 10). With per-scorer
labels [B, K] and weights w [K] it is the paper's Eq. 10:

    loss = mean_B sum_k w_k * -log_sigmoid(-0.5 * beta * label_bk * (model_diff - ref_diff))

A [B] label is the K = 1 case with w = [1]. The metrics are weighted the same way, so Eq. 10 with
one-hot weights reproduces the single-label loss and metrics exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_shapes(mse_B: tuple[jax.Array, ...], label: jax.Array, weights_K) -> None:
    names = ("model_mse_1_B", "model_mse_2_B", "ref_mse_1_B", "ref_mse_2_B")
    shapes = [jnp.shape(x) for x in mse_B]
    if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(
            f"dpo_loss: {', '.join(names)} must be [B] arrays of one shape, got {shapes}"
        )
    b = shapes[0][0]
    if jnp.ndim(label) not in (1, 2) or jnp.shape(label)[0] != b:
        raise ValueError(
            f"dpo_loss: label must be [B] or [B, K] with B={b}, got {jnp.shape(label)}"
        )
    if jnp.ndim(label) == 1 and weights_K is not None:
        raise ValueError(
            "dpo_loss: weights_K is only for per-scorer labels [B, K] (label mode "
            f"'weighted_sum'); got a [B] label {jnp.shape(label)} with weights "
            f"{jnp.shape(weights_K)}"
        )
    if jnp.ndim(label) == 2 and weights_K is not None:
        if jnp.shape(weights_K) != (jnp.shape(label)[1],):
            raise ValueError(
                f"dpo_loss: weights_K {jnp.shape(weights_K)} does not match label [B, K] "
                f"{jnp.shape(label)}"
            )


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (gradient-safe)."""
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, 0.0)


def dpo_loss(
    model_mse_1_B: jax.Array,
    model_mse_2_B: jax.Array,
    ref_mse_1_B: jax.Array,
    ref_mse_2_B: jax.Array,
    label: jax.Array,
    beta: float | jax.Array,
    weights_K: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Diffusion-DPO loss of B pairs and its metrics (scalars).

    Args:
      model_mse_{1,2}_B: per-image mse (over C, H, W) of the policy on image 1 / image 2.
      ref_mse_{1,2}_B: the same for the reference model (gradients are NOT stopped here: the
        caller passes stop_gradient'ed values).
      label: [B] multiplier (+1 image 1 wins, -1 image 2 wins, 0 tie, or soft), or [B, K]
        per-scorer labels for Eq. 10.
      beta: the Diffusion-DPO beta (5000 for SD1.5), applied once.
      weights_K: Eq. 10 weights for a [B, K] label (used as given, no normalisation);
        None means equal weights 1/K. Must be None for a [B] label.

    Returns:
      loss and metrics:
        implicit_accuracy: share of pairs with inside > 0 (strictly, as the authors log it:
          0 when policy == reference), among pairs with label != 0 (label-0 pairs carry no
          preference and are left out of the denominator; 0 when every label is 0);
        model_diff, ref_diff: mean mse(winner) - mse(loser), the winner being the image the
          label's sign prefers, over pairs with label != 0 (negative model_diff: the policy
          denoises the winner better);
        model_mse, ref_mse: mean per-image mse over all 2B images;
        label_abs_mean: mean |label|; label_zero_fraction: share of labels equal to 0;
        abs_inside_median: median |inside| over the pair-and-scorer terms with label != 0
          (unweighted; 0 when there are none): exactly 0 at policy == reference in exact
          arithmetic, so at such a step it measures rounding noise (the trainer logs it after a
          reference refresh as ref_refresh_abs_inside_median).
      For a [B, K] label every pair-and-scorer term is weighted by w_k.
    """
    mse = (model_mse_1_B, model_mse_2_B, ref_mse_1_B, ref_mse_2_B)
    _check_shapes(mse, label, weights_K)
    dtype = jnp.result_type(jnp.float32, *mse)  # at least float32 (bf16 mse is upcast)
    m1, m2, r1, r2 = (jnp.asarray(x, dtype) for x in mse)
    label = jnp.asarray(label, dtype)
    label_BxK = label[:, None] if label.ndim == 1 else label
    k = label_BxK.shape[1]
    if weights_K is None:
        w_K = jnp.full((k,), 1.0 if label.ndim == 1 else 1.0 / k, dtype)
    else:
        w_K = jnp.asarray(weights_K, dtype)

    w_1xK = w_K[None, :]
    model_diff_B = m1 - m2
    ref_diff_B = r1 - r2
    inside_BxK = -0.5 * beta * label_BxK * (model_diff_B - ref_diff_B)[:, None]
    loss = jnp.mean(jnp.sum(w_1xK * -jax.nn.log_sigmoid(inside_BxK), axis=1))

    active_BxK = w_1xK * (label_BxK != 0)
    sign_BxK = jnp.sign(label_BxK)
    den = jnp.sum(active_BxK)
    metrics = {
        "implicit_accuracy": _ratio(jnp.sum(active_BxK * (inside_BxK > 0)), den),
        "model_diff": _ratio(jnp.sum(active_BxK * sign_BxK * model_diff_B[:, None]), den),
        "ref_diff": _ratio(jnp.sum(active_BxK * sign_BxK * ref_diff_B[:, None]), den),
        "model_mse": 0.5 * (jnp.mean(m1) + jnp.mean(m2)),
        "ref_mse": 0.5 * (jnp.mean(r1) + jnp.mean(r2)),
        "label_abs_mean": jnp.mean(jnp.sum(w_1xK * jnp.abs(label_BxK), axis=1)) / jnp.sum(w_K),
        "label_zero_fraction": jnp.mean(jnp.sum(w_1xK * (label_BxK == 0), axis=1)) / jnp.sum(w_K),
        "abs_inside_median": jnp.nan_to_num(
            jnp.nanmedian(jnp.where(active_BxK != 0, jnp.abs(inside_BxK), jnp.nan))
        ),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


SFT_LOSS_TYPES = ("l2", "l1", "pseudo_huber")  # config.diffusion.loss_type


def per_image_error(
    pred_BxCxHxW: jax.Array, target_BxCxHxW: jax.Array, loss_type: str = "l2", huber_c: float = 0.1
) -> jax.Array:
    """float32 [B]: each image's mean per-element error of pred against target.

    'l2'            (pred - target)^2: the mse every Diffusion-DPO loss uses;
    'l1'            |pred - target|: lucidrains' denoising-diffusion-pytorch's loss_type 'l1';
    'pseudo_huber'  c * (sqrt((pred - target)^2 + c^2) - c): the pseudo-Huber loss of diffusers'
                    research_projects/scheduled_huber_loss_training (`conditional_loss`,
                    loss_type 'huber', Khrapov et al. 2024) at a fixed c: ~ (pred - target)^2 / 2
                    below c, ~ c |pred - target| above.
    Why one might want 'l1' for x0: the median of a two-valued target is one of the values where
    the mean blends them, so an uncertain edge would be placed rather than smeared. On the demo
    world it drew worse bases than 'l2' (README, the base recipes)."""
    if loss_type not in SFT_LOSS_TYPES:
        raise ValueError(
            f"config.diffusion.loss_type={loss_type!r}: expected one of {SFT_LOSS_TYPES}"
        )
    diff = pred_BxCxHxW.astype(jnp.float32) - target_BxCxHxW.astype(jnp.float32)
    if loss_type == "l2":
        err = diff**2
    elif loss_type == "l1":
        err = jnp.abs(diff)
    else:
        c = jnp.float32(huber_c)
        # = c * (sqrt(d^2 + c^2) - c), without that difference's float32 cancellation at d << c
        err = c * diff**2 / (jnp.sqrt(diff**2 + c**2) + c)
    return err.mean(axis=tuple(range(1, err.ndim)))


def sft_loss(model_mse_w_B: jax.Array, weights_B: jax.Array | None = None) -> jax.Array:
    """Plain supervised fine-tuning on the winners: mean per-image mse, each image's mse times
    its weight when `weights_B` is given (e.g. schedules.snr_loss_weights)."""
    mse_B = jnp.asarray(model_mse_w_B, jnp.float32)
    if weights_B is None:
        return jnp.mean(mse_B)
    return jnp.mean(jnp.asarray(weights_B, jnp.float32) * mse_B)
