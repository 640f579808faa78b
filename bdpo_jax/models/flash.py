"""Chunked ("flash") attention in plain JAX with a recomputing backward pass.

jax.nn.dot_product_attention's XLA path materialises the [B, N, T, S] logits (and keeps them for
the backward pass); on CPU that memory traffic is most of a UNet step at 32x32 latents. This
computes the same softmax(q k^T / sqrt(H)) v one block of queries at a time, saves only the
log-sum-exp per query, and recomputes each block in the backward pass (FlashAttention's
algorithm, Dao et al. 2022). Math in fp32; the output has the query's dtype.

Inside, batch and heads are folded into one leading axis G = B*N and keys are stored
transposed ([G, H, S]), once, outside the loop: every matmul is then a plain batched matmul
that XLA:CPU runs without a per-iteration transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# logits per block (G x C x S fp32 values): 8 MiB. Measured on a 2-core AVX-512 Xeon (32x32
# latents, 4 heads of 16, batch 4: G = 16, S = 1,024; forward+backward of one attention): 128
# queries per block 43-47 ms, 64: 66-70 ms, 256: 52 ms, 512: 66 ms (each block pays the
# loop's fixed cost; larger ones leave the caches)
BLOCK_ELEMENTS = 2**21


def _chunk_size(t: int, chunk: int | None, g: int, s: int) -> int:
    """The largest divisor of ``t`` that is at most ``chunk`` (default: BLOCK_ELEMENTS / (G S))."""
    chunk = max(1, BLOCK_ELEMENTS // (g * s)) if chunk is None else chunk
    return next(c for c in range(min(t, chunk), 0, -1) if t % c == 0)


def _heads_first(x_BxTxNxH: jax.Array) -> jax.Array:
    b, t, n, h = x_BxTxNxH.shape
    return x_BxTxNxH.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * n, t, h)


def _split(x_GxTxH: jax.Array, c: int) -> jax.Array:
    g, t, h = x_GxTxH.shape
    return x_GxTxH.reshape(g, t // c, c, h).transpose(1, 0, 2, 3)


def _merge(x_KxGxCxH: jax.Array, b: int) -> jax.Array:
    """[K, G, C, H] chunks back to [B, T, N, H]."""
    k, g, c, h = x_KxGxCxH.shape
    return x_KxGxCxH.reshape(k, b, g // b, c, h).transpose(1, 0, 3, 2, 4).reshape(b, k * c, -1, h)


def _forward(q, k, v, chunk):
    b, t, n, h = q.shape
    c = _chunk_size(t, chunk, b * n, k.shape[1])
    q_KxGxCxH = _split(_heads_first(q) * h**-0.5, c)
    kT_GxHxS = _heads_first(k).transpose(0, 2, 1)
    v_GxSxH = _heads_first(v)

    def block(q_GxCxH):
        s_GxCxS = jnp.matmul(q_GxCxH, kT_GxHxS)
        m_GxCx1 = s_GxCxS.max(-1, keepdims=True)
        p_GxCxS = jnp.exp(s_GxCxS - m_GxCx1)
        l_GxCx1 = p_GxCxS.sum(-1, keepdims=True)
        o_GxCxH = jnp.matmul(p_GxCxS, v_GxSxH) / l_GxCx1
        return o_GxCxH, (m_GxCx1 + jnp.log(l_GxCx1))[..., 0]

    o_KxGxCxH, lse_KxGxC = lax.map(block, q_KxGxCxH)
    return _merge(o_KxGxCxH, b), lse_KxGxC


def _attention_fwd(q, k, v, chunk):
    o, lse = _forward(q, k, v, chunk)
    return o.astype(q.dtype), (q, k, v, o, lse)


def _attention_bwd(chunk, residuals, do_BxTxNxH):
    q_in, k_in, v_in, o_BxTxNxH, lse_KxGxC = residuals
    b, t, n, h = q_in.shape
    c = _chunk_size(t, chunk, b * n, k_in.shape[1])
    scale = h**-0.5
    q_GxTxH = _heads_first(q_in) * scale
    k_GxSxH, v_GxSxH = _heads_first(k_in), _heads_first(v_in)
    kT_GxHxS, vT_GxHxS = k_GxSxH.transpose(0, 2, 1), v_GxSxH.transpose(0, 2, 1)
    do_GxTxH = _heads_first(do_BxTxNxH)
    delta_GxT = jnp.sum(do_GxTxH * _heads_first(o_BxTxNxH), axis=-1)

    def block(carry, xs):
        # dk and dv accumulate transposed ([G, H, S]) from q and do blocks transposed once
        # outside the loop: every matmul is then a plain [., C] @ [C, .] product (p^T @ do
        # contracts over p's rows, which XLA:CPU ran outside YNNPACK at ~3x the time)
        dkT_GxHxS, dvT_GxHxS = carry
        q_i, qT_i, do_i, doT_i, lse_i, delta_i = xs  # [G,C,H], [G,H,C] x2, [G,C] x2
        p_GxCxS = jnp.exp(jnp.matmul(q_i, kT_GxHxS) - lse_i[..., None])
        dvT_GxHxS = dvT_GxHxS + jnp.matmul(doT_i, p_GxCxS)
        ds_GxCxS = p_GxCxS * (jnp.matmul(do_i, vT_GxHxS) - delta_i[..., None])
        dq_i = jnp.matmul(ds_GxCxS, k_GxSxH) * scale
        dkT_GxHxS = dkT_GxHxS + jnp.matmul(qT_i, ds_GxCxS)
        return (dkT_GxHxS, dvT_GxHxS), dq_i

    q_KxGxCxH, do_KxGxCxH = _split(q_GxTxH, c), _split(do_GxTxH, c)
    xs = (
        q_KxGxCxH,
        q_KxGxCxH.transpose(0, 1, 3, 2),
        do_KxGxCxH,
        do_KxGxCxH.transpose(0, 1, 3, 2),
        lse_KxGxC,
        _split(delta_GxT[..., None], c)[..., 0],
    )
    zeros = jnp.zeros_like(kT_GxHxS)
    (dkT, dvT), dq_KxGxCxH = lax.scan(block, (zeros, zeros), xs)
    s = k_in.shape[1]
    dk = dkT.reshape(b, n, h, s).transpose(0, 3, 1, 2)
    dv = dvT.reshape(b, n, h, s).transpose(0, 3, 1, 2)
    return _merge(dq_KxGxCxH, b).astype(q_in.dtype), dk.astype(k_in.dtype), dv.astype(v_in.dtype)


def _attention_impl(q, k, v, chunk):
    return _attention_fwd(q, k, v, chunk)[0]


_attention = jax.custom_vjp(_attention_impl, nondiff_argnums=(3,))
_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxNxH: jax.Array,
    v_BxSxNxH: jax.Array,
    chunk: int | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v like jax.nn.dot_product_attention (no mask, no bias)."""
    return _attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, chunk)
