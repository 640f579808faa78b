"""CPU attention defaults: 'auto' resolves to the chunked flash attention, whose block size follows
the logits budget and whose value and gradients match jax.nn.dot_product_attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdpo_jax.models import flash
from bdpo_jax.models.attention import (
    attention_implementation,
    gpu_attention,
    gpu_target,
)


def test_auto_is_chunked_on_cpu_and_explicit_choices_stay():
    assert jax.default_backend() == "cpu"
    assert attention_implementation("auto", jnp.float32, 16) == "chunked"
    assert attention_implementation("auto", jnp.bfloat16, 64) == "chunked"
    for choice in ("xla", "cudnn", "chunked"):
        assert attention_implementation(choice, jnp.float32, 16) == choice
    with pytest.raises(ValueError, match="flash"):
        attention_implementation("flash", jnp.float32, 16)


def test_gpu_auto_rule_by_dtype_head_dim_and_capability():
    # SD1.5's head dims 40/80/160 and SDXL's 64: all cuDNN on Hopper, 160 falls back before it
    for dim in (40, 64, 80, 160):
        assert gpu_attention(jnp.bfloat16, dim, 9.0) == "cudnn"
    assert gpu_attention(jnp.bfloat16, 160, 8.0) == "xla"
    assert gpu_attention(jnp.float16, 128, 8.0) == "cudnn"
    assert gpu_attention(jnp.bfloat16, 260, 9.0) == "xla"  # over 256
    assert gpu_attention(jnp.bfloat16, 36, 9.0) == "xla"  # not a multiple of 8
    assert gpu_attention(jnp.float32, 64, 9.0) == "xla"
    # odd token counts (77 text tokens): jax 0.10's cuDNN attention cannot differentiate them
    assert gpu_attention(jnp.bfloat16, 64, 9.0, 4096, 77) == "xla"
    assert gpu_attention(jnp.bfloat16, 64, 9.0, 4096, 4096) == "cudnn"


def test_gpu_target_context_resolves_auto_as_on_that_gpu():
    with gpu_target(9.0):
        assert attention_implementation("auto", jnp.bfloat16, 160, 4096, 4096) == "cudnn"
        assert attention_implementation("auto", jnp.bfloat16, 160, 4096, 77) == "xla"
        with gpu_target(8.0):
            assert attention_implementation("auto", jnp.bfloat16, 160) == "xla"
        assert attention_implementation("xla", jnp.bfloat16, 64) == "xla"
    assert attention_implementation("auto", jnp.bfloat16, 64) == "chunked"  # CPU again


def test_block_size_follows_the_logits_budget():
    budget = flash.BLOCK_ELEMENTS
    assert budget == 2**21
    assert flash._chunk_size(1024, None, 16, 1024) == budget // (16 * 1024)  # 128
    assert flash._chunk_size(1000, None, 16, 231) == 500  # largest divisor of T under 567
    assert flash._chunk_size(96, 32, 4, 96) == 32  # an explicit chunk wins
    assert flash._chunk_size(7, None, 2**20, 2**20) == 1


@pytest.mark.parametrize("s", [96, 7])
def test_default_blocks_match_dot_product_attention(monkeypatch, s):
    monkeypatch.setattr(flash, "BLOCK_ELEMENTS", 4 * 2 * 24)  # G=4: several query blocks
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 96, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, s, 2, 8)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((2, 96, 2, 8)), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    ref = jax.value_and_grad(lambda *a: loss(jax.nn.dot_product_attention, *a), (0, 1, 2))
    got = jax.value_and_grad(lambda *a: loss(flash.chunked_attention, *a), (0, 1, 2))
    for a, b in zip(jax.tree.leaves(got(q, k, v)), jax.tree.leaves(ref(q, k, v)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
