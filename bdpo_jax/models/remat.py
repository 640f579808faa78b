"""Gradient checkpointing of one layer (a resnet, a transformer layer), as diffusers does it.

`layer_class(cls, remat)` is `nn.remat(cls)` (the backward re-runs the layer's forward instead of
keeping its intermediates) and `run_layer` calls such a layer so that its backward hands on the
input's gradient only together with the gradient of the layer's own parameters: the two pass
one `jax.lax.optimization_barrier`. Without it XLA's GPU schedule on a multi-device mesh
computed the weight gradients of every layer last, next to the gradient all-reduces, and kept
each layer's activation gradients alive until then (SD1.5 on 8 H100s, compiled without a GPU:
28 GiB of temporaries per device against 8.7 GiB for the same per-device batch on one; README,
"Real sizes"). The math is unchanged (tests/test_unet.py).

XLA:CPU removes optimization barriers right after CSE (its cse_barrier_expander, before
scheduling, leaving no control dependency), so there they order nothing. On CPU
(`jax.lax.platform_dependent`, resolved when the step is lowered) the same two orders are data
dependencies instead: each input gradient gets `0 * max(weight gradient)` added, and the
layer's saved inputs get `0 * max(output gradient)` added before it is re-run, so that XLA:CPU
re-runs a layer only when its backward is next (it had hoisted the re-runs of several layers
together). Adding a zero changes no finite value (a NaN or inf gradient spreads to the layer's
other gradients, which a step with one is lost to anyway). SD1.5's DPO step on 8 fake CPU
devices: 72.1 GiB per device without them, 31.0 with them (bench/memory.py); a chain of layers
in tests/test_remat.py.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def layer_class(cls: type[nn.Module], remat: bool) -> type[nn.Module]:
    """`cls`, checkpointed when `remat`."""
    return nn.remat(cls) if remat else cls


def _zero_from(anchor: Any) -> jax.Array:
    """A float32 zero that XLA can only compute once every inexact leaf of `anchor` exists."""
    leaves = [a for a in jax.tree_util.tree_leaves(anchor) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return 0.0 * sum((jnp.max(a).astype(jnp.float32) for a in leaves), jnp.float32(0.0))


def _plus(values: Any, zero: jax.Array) -> Any:
    return jax.tree_util.tree_map(
        lambda v: v + zero.astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.inexact) else v, values
    )


def _recompute_after_cpu(vjp_fn: Any, d_out: Any) -> Any:
    """The layer's residuals (params, saved inputs), dependent on its output gradient."""
    return _plus(vjp_fn, _zero_from(d_out))


def _together_cpu(grads: tuple) -> tuple:
    """(param grads, *input grads), the input grads dependent on the param grads."""
    param_grads, *input_grads = grads
    return (param_grads, *_plus(tuple(input_grads), _zero_from(param_grads)))


def run_layer(layer: nn.Module, *args: Any, remat: bool) -> Any:
    """`layer(*args)`; with `remat`, its parameter and input gradients leave its backward
    together (see the module docstring)."""
    if not remat:
        return layer(*args)

    def call(module, *inputs):
        return module(*inputs)

    def forward(module, *inputs):
        return nn.vjp(call, module, *inputs)  # (output, vjp function as the residual)

    def backward(vjp_fn, d_out):
        vjp_fn = jax.lax.platform_dependent(
            vjp_fn, d_out, cpu=_recompute_after_cpu, default=lambda fn, _: fn
        )
        grads = vjp_fn(d_out)  # (params grads, *input grads)
        return jax.lax.platform_dependent(
            grads, cpu=_together_cpu, default=jax.lax.optimization_barrier
        )

    return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(layer, *args)
