"""bdpo_jax.jaxpr_memory: program-order peak bytes, checked on programs counted by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from bdpo_jax import jaxpr_memory

F32 = 4


def _peak(fn, *args, **kw):
    return jaxpr_memory.peak_bytes(jax.make_jaxpr(fn)(*args), **kw)


def _m(n):
    return jnp.zeros((n, n), jnp.float32)


def test_a_chain_of_matmuls_holds_two_values_at_once():
    """a = x@w, b = a@w, c = b@w: while b is computed a is live, while c is computed b is;
    nothing else (x and w are the caller's)."""
    n = 8
    x = w = _m(n)
    assert _peak(lambda x, w: ((x @ w) @ w) @ w, x, w) == 2 * n * n * F32


def test_a_value_read_late_stays_until_its_last_use():
    """a = x@w is read again by the last equation: it is live while b and c are built."""
    n = 8
    x = w = _m(n)

    def fn(x, w):
        a = x @ w
        b = a @ w
        c = b @ w
        return c @ a

    # at c = b @ w: a, b and c live; at c @ a: a, c and the result
    assert _peak(fn, x, w) == 3 * n * n * F32


def test_elementwise_chains_are_fused_and_not_stored():
    """exp(a) * 2 + a: exp and * 2 fused into the add's loop, so only a (a matmul's output) and
    the result are stored; unfused, exp(a) and exp(a) * 2 would be held beside a (3 units)."""
    n = 8
    x = w = _m(n)

    def fn(x, w):
        a = x @ w
        return jnp.exp(a) * 2.0 + a

    assert _peak(fn, x, w) == 2 * n * n * F32
    # an elementwise value that a matmul reads is stored (it is the matmul's operand)
    assert _peak(lambda x, w: (jnp.exp(x) * 2.0) @ w, x, w) == 2 * n * n * F32


def test_a_fused_value_keeps_its_inputs_alive_until_its_reader_runs():
    """e = exp(a) is fused into the final add, so a (not e) is held across b and c."""
    n = 8
    x = w = _m(n)

    def fn(x, w):
        a = x @ w
        e = jnp.exp(a)
        b = x @ w + 0.0  # an independent matmul in between
        c = b @ w
        return c + e

    # at c = b @ w: a, b, c live (e never stored); at the end: a, c and the result
    assert _peak(fn, x, w) == 3 * n * n * F32


def test_reductions_read_fused_producers():
    n = 16
    x = w = _m(n)
    # a = x@w stored; exp(a) fused into the sum; the sum's output is a scalar
    assert _peak(lambda x, w: jnp.sum(jnp.exp(x @ w)), x, w) == n * n * F32 + F32


def test_cond_counts_its_largest_branch_and_scan_its_outputs_and_body():
    n = 8
    x = w = _m(n)

    def with_cond(p, x, w):
        return jax.lax.cond(p, lambda x: (x @ w) @ w, lambda x: x @ w, x)

    # the first branch holds two n x n values at once (the cond's output is one of them), while
    # the branch index (the predicate as an int32) is held
    assert _peak(with_cond, True, x, w) == 2 * n * n * F32 + 4

    def with_scan(x, w):
        def body(c, _):
            a = c @ w
            return a, a @ w

        return jax.lax.scan(body, x, None, length=5)

    # stacked outputs (5 x n x n) and the carry out, plus one iteration's body: a, a @ w
    body = 2 * n * n * F32
    assert _peak(with_scan, x, w) == (5 + 1) * n * n * F32 + body


def test_min_itemsize_and_custom_sizes():
    n = 8
    x = w = jnp.zeros((n, n), jnp.bfloat16)
    fn = lambda x, w: (x @ w) @ w  # noqa: E731
    assert _peak(fn, x, w) == 2 * n * n * 2
    assert _peak(fn, x, w, size_of=lambda v: jaxpr_memory.value_bytes(v, 4)) == 2 * n * n * 4


def test_the_backward_of_checkpointed_layers_holds_one_layer_and_the_layer_inputs():
    """grad (w.r.t. x) of a chain of L checkpointed layers h -> tanh(h @ w) @ w, counted by hand.
    The forward saves each layer's input (L - 1 of them: the first is the caller's x). The
    backward starts with the last layer, while all L - 1 saved inputs and the output's cotangent
    (ones, one unit) are held; re-running it stores d = h @ w and g = cotangent @ w^T, and
    j = g * (1 - tanh(d)^2) (tanh, 1 - tanh, the products fused: not stored) as the operand of
    its last matmul: three units at once. Peak: (L - 1) + 1 + 3 units."""
    n, layers = 8, 4
    x = w = _m(n)
    unit = n * n * F32

    def layer(h, w):
        return jnp.tanh(h @ w) @ w

    def chain(depth):
        def fn(x, w):
            h = x
            for _ in range(depth):
                h = jax.checkpoint(layer)(h, w)
            return jnp.sum(h)

        return fn

    assert _peak(jax.grad(chain(layers)), x, w) == (layers - 1 + 1 + 3) * unit
    assert _peak(jax.grad(chain(layers + 1)), x, w) == (layers + 1 + 3) * unit


def test_value_bytes_of_tokens_is_zero():
    closed = jax.make_jaxpr(lambda: jax.lax.create_token())()
    (out,) = closed.jaxpr.outvars
    assert jaxpr_memory.value_bytes(out) == 0
    assert np.dtype(jnp.float32).itemsize == F32
