"""The optimiser: AdamW or Adafactor, warm-up then constant or cosine, global-norm clipping.

Mirrors Diffusion-DPO's train.py (SalesforceAIResearch/DiffusionDPO):
- lr scaling (--scale_lr): lr * train_batch_size * gradient_accumulation_steps * num_processes,
  i.e. lr * (pairs per optimiser step). Our config.train.global_batch_size already counts every
  micro-batch of an optimiser step, so `effective_learning_rate` = learning_rate *
  global_batch_size (accumulation is inside it, not multiplied again).
- diffusers' "constant_with_warmup": lr * min(1, step / warmup); step 0 uses lr 0.
- AdamW(b1, b2, eps, weight_decay) on fp32 params; clip_grad_norm_(max_norm) before it.
- SDXL: transformers.Adafactor(lr, weight_decay, clip_threshold=1.0, scale_parameter=False,
  relative_step=False) -> `adafactor_like_transformers` (optax pieces, transformers' decay).
Gradient accumulation is done in the train step (a lax.scan over micro-batches), not here.
"""

from __future__ import annotations

import ml_collections
import optax

from bdpo_jax.schema import ConfigError

OPTIMIZERS = ("adamw", "adafactor")  # config.optim.optimizer
LR_SCHEDULES = ("constant", "cosine")  # config.optim.schedule


def effective_learning_rate(
    optim_config: ml_collections.ConfigDict, global_batch_size: int
) -> float:
    """Peak learning rate after Diffusion-DPO's optional --scale_lr scaling."""
    lr = float(optim_config.learning_rate)
    return lr * global_batch_size if optim_config.scale_lr else lr


def make_lr_schedule(
    optim_config: ml_collections.ConfigDict, global_batch_size: int, total_steps: int
) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine decay to 0 at `total_steps`."""
    peak = effective_learning_rate(optim_config, global_batch_size)
    warmup = int(optim_config.warmup_steps)
    if optim_config.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    if optim_config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.0
        )
    raise ConfigError(
        f"config.optim.schedule={optim_config.schedule!r}: expected one of {LR_SCHEDULES}"
    )


def adafactor_like_transformers(
    learning_rate: optax.ScalarOrSchedule,
    *,
    decay_rate: float = 0.8,
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    eps: float = 1e-30,
) -> optax.GradientTransformation:
    """transformers.Adafactor(scale_parameter=False, relative_step=False, warmup_init=False).

    Same factored second moment (beta2_t = 1 - t^-decay_rate) and RMS update clipping as
    optax.adafactor, but with transformers' decoupled weight decay p -= lr * wd * p (optax's
    adafactor adds wd * p AFTER the lr scaling, i.e. without lr). Matrices are factored when
    their second-largest dim is >= 128 (transformers factors every matrix; for SD's 3x3 convs it
    factors the 3x3 window, optax the channel dims: not bit-identical there).
    """
    parts = [
        optax.scale_by_factored_rms(decay_rate=decay_rate, epsilon=eps),
        optax.clip_by_block_rms(clip_threshold),
    ]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def make_optimizer(
    optim_config: ml_collections.ConfigDict, global_batch_size: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, lr schedule); clipping is part of the chain."""
    schedule = make_lr_schedule(optim_config, global_batch_size, total_steps)
    name = optim_config.optimizer
    if name == "adamw":
        inner = optax.adamw(
            schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
        )
    elif name == "adafactor":
        inner = adafactor_like_transformers(
            schedule,
            decay_rate=optim_config.adafactor_decay_rate,
            clip_threshold=optim_config.adafactor_clip_threshold,
            weight_decay=optim_config.weight_decay,
        )
    else:
        raise ConfigError(f"config.optim.optimizer={name!r}: expected one of {OPTIMIZERS}")
    parts = []
    if optim_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    parts.append(inner)
    return optax.chain(*parts), schedule
