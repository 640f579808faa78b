"""The optimiser and lr schedules against torch.optim.AdamW, transformers.Adafactor and
diffusers' lr schedulers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bdpo_jax import optim, schema
from configs import tiny

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")


def _optim_config(**kw):
    base = tiny.get_config().optim.to_dict()
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _run_optax(tx, p0, grads):
    p = jax.tree.map(jnp.asarray, p0)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    return p


def _problem(shapes, steps=6, scale=3.0):
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
        for _ in range(steps)
    ]
    return p0, grads


def test_adamw_with_warmup_and_clipping_matches_torch():
    from diffusers.optimization import get_constant_schedule_with_warmup

    cfg = _optim_config(
        learning_rate=1e-2,
        scale_lr=False,
        warmup_steps=3,
        grad_clip_norm=1.0,
        weight_decay=1e-2,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
    )
    p0, grads = _problem({"w": (5, 3), "b": (3,)})
    tx, _ = optim.make_optimizer(cfg, global_batch_size=8, total_steps=10)
    p = _run_optax(tx, p0, grads)

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    opt = torch.optim.AdamW(
        list(tp.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2
    )
    sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=3)
    for g in grads:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        opt.step()
        sched.step()
    for k in tp:
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), atol=2e-6)
        assert not np.allclose(np.asarray(p[k]), p0[k])


def test_adafactor_matches_transformers():
    from transformers.optimization import Adafactor

    cfg = _optim_config(
        optimizer="adafactor",
        learning_rate=1e-2,
        scale_lr=False,
        warmup_steps=0,
        grad_clip_norm=0.0,
        weight_decay=1e-2,
    )
    p0, grads = _problem({"w": (128, 130), "b": (7,)}, steps=5, scale=1.0)
    tx, _ = optim.make_optimizer(cfg, global_batch_size=1, total_steps=10)
    p = _run_optax(tx, p0, grads)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    opt = Adafactor(
        list(tp.values()),
        lr=1e-2,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        clip_threshold=1.0,
        decay_rate=-0.8,
        weight_decay=1e-2,
    )
    for g in grads:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        opt.step()
    for k in tp:
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), atol=2e-6)


def test_lr_schedules_match_diffusers_and_scale_lr():
    from diffusers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
    )

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    const = get_constant_schedule_with_warmup(dummy, num_warmup_steps=5)
    cos = get_cosine_schedule_with_warmup(dummy, num_warmup_steps=5, num_training_steps=40)
    ours_const = optim.make_lr_schedule(
        _optim_config(learning_rate=1.0, scale_lr=False, warmup_steps=5), 128, 40
    )
    ours_cos = optim.make_lr_schedule(
        _optim_config(learning_rate=1.0, scale_lr=False, warmup_steps=5, schedule="cosine"), 128, 40
    )
    for step in range(40):
        assert float(ours_const(step)) == pytest.approx(const.lr_lambdas[0](step), abs=1e-6)
        assert float(ours_cos(step)) == pytest.approx(cos.lr_lambdas[0](step), abs=1e-6)
    # Diffusion-DPO --scale_lr: lr x pairs per optimiser step
    scaled = _optim_config(learning_rate=1e-8, scale_lr=True, warmup_steps=0)
    assert optim.effective_learning_rate(scaled, 128) == pytest.approx(1.28e-6)
    with pytest.raises(schema.ConfigError, match="config.optim.schedule"):
        optim.make_lr_schedule(_optim_config(schedule="linear"), 1, 1)
    with pytest.raises(schema.ConfigError, match="config.optim.optimizer"):
        optim.make_optimizer(_optim_config(optimizer="sgd"), 1, 1)
