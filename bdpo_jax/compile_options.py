"""XLA compiler options the package chooses for a backend (passed to `jax.jit`).

On CPU, XLA hands convolutions to YNNPACK by default (jax 0.10: YNN fusions for reductions,
dots and convolutions). YNNPACK computes a convolution's kernel gradient as a convolution with
the whole image as its window and a 3x3 output, which it runs ~3-4x slower than XLA's own
(Eigen) convolution: 12.0 vs 3.5 ms for a 64->64 3x3 kernel gradient at 32x16x16 on 2 cores.
So on CPU the package keeps YNNPACK for reductions and dots and gives convolutions back to XLA
(README, Benchmarks: the demo UNet's forward+backward ~14% faster). GPU and TPU get no options.

A user's own `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS wins: then nothing is set.

Importing this module also runs single-device CPU computations on the calling thread
(`host_memory.run_on_calling_thread`, before JAX's CPU client exists), so that the calling
thread's heap can keep XLA:CPU's buffers between calls (`host_memory.keep_freed_memory`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bdpo_jax import host_memory

# before JAX's CPU client exists: computations on the calling thread, whose heap can keep
# XLA:CPU's buffers (host_memory.keep_freed_memory, called where the model's size is known)
host_memory.run_on_calling_thread()

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# jax 0.10's default is REDUCE, INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION: this drops the last
CPU_YNN_FUSIONS = ("LIBRARY_FUSION_TYPE_REDUCE", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")


def options_for(backend: str, xla_flags: str) -> dict[str, str] | None:
    """The compiler options for `backend` given the XLA_FLAGS in effect (a pure rule)."""
    if backend != "cpu" or YNN_FUSION_FLAG in xla_flags:
        return None
    return {YNN_FUSION_FLAG: ",".join(CPU_YNN_FUSIONS)}


@functools.cache
def _accepted(backend: str, options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib compiles with `options` (the flag is experimental: a jaxlib that
    renamed it gets no options and one warning instead of a failing compile)."""
    try:
        jax.jit(jnp.negative, compiler_options=dict(options)).lower(
            jnp.zeros((1,), jnp.float32)
        ).compile()
        return True
    except Exception as err:  # noqa: BLE001 -- any refusal means: compile without them
        logging.warning("XLA refused the %s compiler options (%s); using none", backend, err)
        return False


def compiler_options() -> dict[str, str] | None:
    """The options for the default backend, as `jax.jit(..., compiler_options=...)` takes."""
    backend = jax.default_backend()
    options = options_for(backend, os.environ.get("XLA_FLAGS", ""))
    if options is None or not _accepted(backend, tuple(sorted(options.items()))):
        return None
    return options


def jit(fun: Callable[..., Any], **kwargs: Any) -> Any:
    """`jax.jit(fun, **kwargs)` with the package's compiler options for the default backend."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
