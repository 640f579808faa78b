"""Chunked ("flash") attention in plain JAX with a recomputing backward pass.

jax.nn.dot_product_attention's XLA path materialises the [B, N, T, S] logits (and keeps them for
the backward pass); on CPU that memory traffic is most of a UNet step at 32x32 latents. This
computes the same softmax(q k^T / sqrt(H)) v one block of queries at a time, saves only the
log-sum-exp per query, and recomputes each block in the backward pass (FlashAttention's
algorithm, Dao et al. 2022). Math in fp32; the output has the query's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_CHUNK = 128


def _chunk_size(t: int, chunk: int) -> int:
    """The largest divisor of ``t`` that is at most ``chunk``."""
    return next(c for c in range(min(t, chunk), 0, -1) if t % c == 0)


def _split(x_BxTxNxH: jax.Array, c: int) -> jax.Array:
    b, t, n, h = x_BxTxNxH.shape
    return x_BxTxNxH.reshape(b, t // c, c, n, h).transpose(1, 0, 2, 3, 4)


def _merge(x_KxBxCxNxH: jax.Array) -> jax.Array:
    k, b, c, n, h = x_KxBxCxNxH.shape
    return x_KxBxCxNxH.transpose(1, 0, 2, 3, 4).reshape(b, k * c, n, h)


def _forward(q, k, v, chunk):
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    c = _chunk_size(q.shape[1], chunk)
    scale = q.shape[-1] ** -0.5

    def block(q_BxCxNxH):
        s_BxNxCxS = jnp.einsum("bcnh,bsnh->bncs", q_BxCxNxH, k)
        m = s_BxNxCxS.max(-1, keepdims=True)
        p = jnp.exp(s_BxNxCxS - m)
        l = p.sum(-1, keepdims=True)
        o_BxCxNxH = jnp.einsum("bncs,bsnh->bcnh", p / l, v)
        return o_BxCxNxH, (m + jnp.log(l))[..., 0]

    o, lse_KxBxNxC = lax.map(block, _split(q * scale, c))
    return _merge(o), lse_KxBxNxC


def _attention_fwd(q, k, v, chunk):
    o, lse = _forward(q, k, v, chunk)
    return o.astype(q.dtype), (q, k, v, o, lse)


def _attention_bwd(chunk, residuals, do_BxTxNxH):
    q_in, k_in, v_in, o, lse_KxBxNxC = residuals
    q, k, v = (x.astype(jnp.float32) for x in (q_in, k_in, v_in))
    do = do_BxTxNxH.astype(jnp.float32)
    c = _chunk_size(q.shape[1], chunk)
    scale = q.shape[-1] ** -0.5
    delta_BxTxN = jnp.einsum("btnh,btnh->btn", do, o)

    def block(carry, xs):
        dk, dv = carry
        q_i, do_i, lse_i, delta_i = xs  # [B,C,N,H], [B,C,N,H], [B,N,C], [B,C,N]
        p_BxNxCxS = jnp.exp(jnp.einsum("bcnh,bsnh->bncs", q_i, k) - lse_i[..., None])
        dv = dv + jnp.einsum("bncs,bcnh->bsnh", p_BxNxCxS, do_i)
        dp = jnp.einsum("bcnh,bsnh->bncs", do_i, v)
        ds = p_BxNxCxS * (dp - delta_i.transpose(0, 2, 1)[..., None])
        dq_i = jnp.einsum("bncs,bsnh->bcnh", ds, k) * scale
        dk = dk + jnp.einsum("bncs,bcnh->bsnh", ds, q_i)
        return (dk, dv), dq_i

    xs = (
        _split(q * scale, c),
        _split(do, c),
        lse_KxBxNxC,
        _split(delta_BxTxN[..., None], c)[..., 0],
    )
    (dk, dv), dq = lax.scan(block, (jnp.zeros_like(k), jnp.zeros_like(v)), xs)
    return _merge(dq).astype(q_in.dtype), dk.astype(k_in.dtype), dv.astype(v_in.dtype)


def _attention_impl(q, k, v, chunk):
    return _attention_fwd(q, k, v, chunk)[0]


_attention = jax.custom_vjp(_attention_impl, nondiff_argnums=(3,))
_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(
    q_BxTxNxH: jax.Array, k_BxSxNxH: jax.Array, v_BxSxNxH: jax.Array, chunk: int = DEFAULT_CHUNK
) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v like jax.nn.dot_product_attention (no mask, no bias)."""
    return _attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, chunk)
