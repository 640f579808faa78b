"""Spatial transformer: Transformer2DModel, BasicTransformerBlock, Attention, GEGLU feed-forward.

Mirrors diffusers/models/transformers/transformer_2d.py (continuous input), attention.py
(BasicTransformerBlock, FeedForward), attention_processor.py (Attention + AttnProcessor2_0) and
activations.py (GEGLU with exact GELU). On GPU attention runs through
``jax.nn.dot_product_attention``; its XLA path already computes logits and softmax in fp32, which
is what diffusers' ``upcast_attention`` asks for, and cuDNN flash attention accumulates in fp32
too. On CPU "auto" picks "chunked" (flash.py), a plain-JAX flash attention: the XLA path's
materialised logits made a 32x32-latent UNet forward+backward about 4x slower than PyTorch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdpo_jax.models.flash import chunked_attention
from bdpo_jax.models.norms import GroupNorm, LayerNorm
from bdpo_jax.models.remat import layer_class, run_layer
from bdpo_jax.models.resnet import conv

ATTENTION_CHOICES = ("auto", "xla", "cudnn", "chunked")


_GPU_TARGET: list[float] = []  # compute capability of a compile-only GPU target (gpu_target)


@contextlib.contextmanager
def gpu_target(compute_capability: float) -> Iterator[None]:
    """Within this context "auto" resolves as on a CUDA GPU of `compute_capability` (e.g. 9.0)
    whatever the default backend: for a step compiled ahead of time for GPUs on a machine without
    one (bench/memory.py --target gpu-h100), where the default backend is the CPU."""
    _GPU_TARGET.append(float(compute_capability))
    try:
        yield
    finally:
        _GPU_TARGET.pop()


def attention_implementation(
    choice: str, dtype: jnp.dtype, head_dim: int, q_len: int = 0, kv_len: int = 0
) -> str:
    """The attention kernel a setting resolves to on this backend: "chunked", "xla" or "cudnn".

    "auto" picks "chunked" (flash.py) on CPU; on GPU `gpu_attention`'s choice, else the XLA path
    of jax.nn.dot_product_attention. Any other choice is returned as given.
    """
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention={choice!r} is not one of {ATTENTION_CHOICES}")
    if choice != "auto":
        return choice
    if _GPU_TARGET:
        return gpu_attention(dtype, head_dim, _GPU_TARGET[-1], q_len, kv_len)
    if jax.default_backend() == "cpu":
        return "chunked"
    if jax.default_backend() != "gpu":
        return "xla"
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return gpu_attention(dtype, head_dim, float(capability), q_len, kv_len)


def gpu_attention(
    dtype: jnp.dtype, head_dim: int, compute_capability: float, q_len: int = 0, kv_len: int = 0
) -> str:
    """What "auto" picks on a CUDA GPU of `compute_capability` (e.g. 9.0): "cudnn" (flash
    attention) for fp16/bf16 with head_dim a multiple of 8 and at most 128 (256 from Hopper, 9.0,
    on) and even sequence lengths, else "xla". Odd lengths: jax 0.10's cuDNN attention refuses
    to differentiate them ("Unsupported sequence length Q 4096, KV 77": its no-bias placeholder
    counts as a bias, and training with a bias needs even lengths), so the 77 text tokens of
    cross-attention take the XLA path (its [T, 77] logits are small)."""
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "xla"
    max_dim = 256 if compute_capability >= 9.0 else 128
    if q_len % 2 or kv_len % 2:
        return "xla"
    return "cudnn" if head_dim % 8 == 0 and head_dim <= max_dim else "xla"


def split_over_mesh(x: jax.Array) -> jax.Array:
    """`x` with its leading (batch) axis split over every axis of the mesh being traced under
    (the trainer traces its step under its (data, fsdp) mesh, both batch axes:
    sharding.traced_under_mesh), the rest replicated; `x` itself outside a mesh. For the cuDNN
    call, whose partitioning cannot follow XLA's propagated sharding: jax 0.10's cuDNN attention
    under FSDP was handed the projection kernels' split of the heads, which SDXL's 10 or 20
    heads cannot take over 8 devices (IndivisibleError)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(mesh.axis_names))


# the implementations whose q, k, v and output are placed over the batch axes under a mesh:
# cuDNN's call (see split_over_mesh) and the chunked loop, whose carried blocks XLA's sharding
# propagation otherwise gathered to the whole batch under FSDP (SDXL on 8 CPU devices: the
# while loop's [4096 tokens, 256 x 10 heads, 64] f32 blocks, 2.5 GiB each; README, "Real sizes")
SPLIT_OVER_BATCH = ("cudnn", "chunked")


class Attention(nn.Module):
    """Multi-head attention: to_q/to_k/to_v without bias, to_out_0 with bias."""

    heads: int
    dim_head: int
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, context_BxSxE: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        ctx = x_BxTxD if context_BxSxE is None else context_BxSxE
        b, t, d = x_BxTxD.shape
        s = ctx.shape[1]
        q = nn.Dense(inner, use_bias=False, name="to_q", **kw)(x_BxTxD)
        k = nn.Dense(inner, use_bias=False, name="to_k", **kw)(ctx)
        v = nn.Dense(inner, use_bias=False, name="to_v", **kw)(ctx)
        q_BxTxNxH = q.reshape(b, t, self.heads, self.dim_head)
        k_BxSxNxH = k.reshape(b, s, self.heads, self.dim_head)
        v_BxSxNxH = v.reshape(b, s, self.heads, self.dim_head)
        impl = attention_implementation(self.attention, self.dtype, self.dim_head, t, s)
        if impl in SPLIT_OVER_BATCH:  # under FSDP: batch-split, not heads-split
            q_BxTxNxH, k_BxSxNxH, v_BxSxNxH = (
                split_over_mesh(a) for a in (q_BxTxNxH, k_BxSxNxH, v_BxSxNxH)
            )
        if impl == "chunked":
            o_BxTxNxH = chunked_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH)
        else:
            o_BxTxNxH = jax.nn.dot_product_attention(
                q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, implementation=impl
            )
        if impl in SPLIT_OVER_BATCH:  # and so is the output's cotangent, the backward's input
            o_BxTxNxH = split_over_mesh(o_BxTxNxH)
        return nn.Dense(d, name="to_out_0", **kw)(o_BxTxNxH.reshape(b, t, inner))


class GEGLU(nn.Module):
    """proj to 2*inner, split into (hidden, gate), hidden * gelu(gate) with exact GELU."""

    inner: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.inner, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)
        hidden, gate = jnp.split(h(x_BxTxD), 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """net_0 = GEGLU(dim -> 4 dim), net_2 = Linear(4 dim -> dim)."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = x_BxTxD.shape[-1]
        h = GEGLU(4 * d, name="net_0", **kw)(x_BxTxD)
        return nn.Dense(d, name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual."""

    heads: int
    dim_head: int
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, context_BxSxE: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        att = dict(heads=self.heads, dim_head=self.dim_head, attention=self.attention, **kw)
        x = x_BxTxD + Attention(name="attn1", **att)(LayerNorm(name="norm1", **kw)(x_BxTxD))
        x = x + Attention(name="attn2", **att)(LayerNorm(name="norm2", **kw)(x), context_BxSxE)
        return x + FeedForward(name="ff", **kw)(LayerNorm(name="norm3", **kw)(x))


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6), proj_in (1x1 conv or linear), blocks, proj_out, residual."""

    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    attention: str = "auto"
    remat: bool = False  # checkpoint each transformer layer (nn.remat)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, context_BxSxE: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x_BxHxWxC.shape
        y = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x_BxHxWxC)
        if self.use_linear_projection:
            y = nn.Dense(c, name="proj_in", **kw)(y.reshape(b, h * w, c))
        else:
            y = conv(c, 1, "proj_in", **kw)(y).reshape(b, h * w, c)
        block_cls = layer_class(BasicTransformerBlock, self.remat)
        for i in range(self.num_layers):
            block = block_cls(
                self.heads, c // self.heads, self.attention, name=f"transformer_blocks_{i}", **kw
            )
            y = run_layer(block, y, context_BxSxE, remat=self.remat)
        if self.use_linear_projection:
            y = nn.Dense(c, name="proj_out", **kw)(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, "proj_out", **kw)(y.reshape(b, h, w, c))
        return y + x_BxHxWxC.astype(self.dtype)
