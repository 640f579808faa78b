"""The package's XLA compiler options: the pure rule, and on this CPU convolutions leave YNNPACK
while their gradients stay as exact (both programs against an fp64 numpy convolution)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bdpo_jax import compile_options
from bdpo_jax.compile_options import YNN_FUSION_FLAG, options_for


def test_options_only_on_cpu_and_never_over_the_users_flag():
    cpu = options_for("cpu", "")
    assert cpu == {YNN_FUSION_FLAG: ",".join(compile_options.CPU_YNN_FUSIONS)}
    assert "CONVOLUTION" not in cpu[YNN_FUSION_FLAG]
    assert options_for("gpu", "") is None and options_for("tpu", "") is None
    assert options_for("cpu", f"--{YNN_FUSION_FLAG}=-eltwise --xla_cpu_ftz=true") is None


def _conv_loss(x, k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    return jnp.sum(jnp.sin(y))


def test_cpu_convolutions_leave_ynnpack_and_gradients_agree(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 32, 32)) * 0.1, jnp.float32)
    grad = jax.grad(_conv_loss, argnums=(0, 1))
    options = compile_options.compiler_options()
    assert options is not None  # this jaxlib accepts the flag

    def ynn_convolutions(compiled) -> int:
        """Convolutions inside computations that a YNN fusion calls."""
        bodies, name = {}, None
        for line in compiled.as_text().splitlines():
            if line and not line.startswith(" ") and line.endswith("{"):
                name = line.split()[0].lstrip("%")
                bodies[name] = []
            elif name is not None:
                bodies[name].append(line)
        called = [
            line.split("calls=%")[1].split(",")[0].split()[0]
            for body in bodies.values()
            for line in body
            if "__ynn_fusion" in line and "calls=%" in line
        ]
        return sum("convolution(" in "\n".join(bodies.get(c, [])) for c in called)

    default = jax.jit(grad).lower(x, k).compile()
    tuned = compile_options.jit(grad).lower(x, k).compile()
    assert ynn_convolutions(default) > 0 and ynn_convolutions(tuned) == 0
    # both programs against fp64 numpy (the sums differ in order: compare with the exact one)
    x64, k64 = np.asarray(x, np.float64), np.asarray(k, np.float64)
    pad = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [(i, j) for i in range(3) for j in range(3)]
    y = sum(pad[:, i : i + 16, j : j + 16] @ k64[i, j] for i, j in taps)
    dy = np.cos(y)
    dk = np.stack([np.einsum("bhwc,bhwo->co", pad[:, i : i + 16, j : j + 16], dy) for i, j in taps])
    dpad = np.zeros_like(pad)
    for i, j in taps:
        dpad[:, i : i + 16, j : j + 16] += dy @ k64[i, j].T
    refs = (dpad[:, 1:-1, 1:-1], dk.reshape(k64.shape))
    for program in (default, tuned):
        for got, ref in zip(program(x, k), refs, strict=True):
            np.testing.assert_allclose(np.asarray(got), ref, atol=2e-6 * np.abs(ref).max())
