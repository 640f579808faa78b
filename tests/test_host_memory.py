"""Host memory on CPU (bdpo_jax.host_memory): the pure rules, and in a fresh process an XLA:CPU
program whose temporary buffer is 64 MiB stops faulting it in on every call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bdpo_jax.host_memory import (
    ACCELERATOR_PLUGINS,
    OPT_OUT_ENV,
    RAM_PER_PARAM_BYTE,
    fp32_bytes,
    small_enough,
    wanted,
)


def test_rule_linux_glibc_cpu_only_and_not_turned_off():
    assert wanted("linux", "glibc", "", "", [])
    assert not wanted("darwin", "", "", "", [])
    assert not wanted("linux", "musl", "", "", [])  # another libc: its own mallopt, if any
    assert not wanted("linux", "glibc", "", "0", [])  # BDPO_KEEP_FREED_MEMORY=0
    assert wanted("linux", "glibc", "", "1", [])
    for plugin in ACCELERATOR_PLUGINS:  # JAX would default to a GPU or TPU
        assert not wanted("linux", "glibc", "", "", [plugin])
    # JAX_PLATFORMS decides when set, plugins or not
    assert wanted("linux", "glibc", "cpu", "", ["jax-cuda12-plugin"])
    assert not wanted("linux", "glibc", "cuda,cpu", "", [])


def test_only_models_small_for_the_machine_keep_freed_memory():
    gib = 2**30
    assert RAM_PER_PARAM_BYTE == 128
    assert small_enough(4 * 2_000_000, 24 * gib)  # the demo UNet on this machine
    assert small_enough(4 * 17_839_556, 24 * gib)  # the small bench UNet
    assert not small_enough(4 * 859_520_964, 24 * gib)  # SD1.5: its CPU run needs the OS back
    assert small_enough(24 * gib // 128, 24 * gib) and not small_enough(
        24 * gib // 128 + 1, 24 * gib
    )
    assert not small_enough(1, 0)  # memory unknown
    assert fp32_bytes({"a": np.zeros((3, 4)), "b": [np.zeros(5, np.float16)]}) == 4 * 17


_PROBE = textwrap.dedent(
    """
    import json, resource
    import jax, jax.numpy as jnp
    from bdpo_jax import compile_options, host_memory

    # the dot's [4096, 4096] output is a 64 MiB temporary: XLA allocates it on every call
    f = compile_options.jit(lambda x, w: jnp.sin(x @ w).sum())
    x = jnp.ones((4096, 64), jnp.float32)
    w = jnp.ones((64, 4096), jnp.float32)
    host_memory.keep_freed_memory(host_memory.fp32_bytes((x, w)))
    for _ in range(10):  # the heap grows over the first calls (other allocations interleave)
        f(x, w).block_until_ready()
    faults = []
    for _ in range(9):  # median per call: a late free can still make one call grow the heap
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x, w).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = sorted(faults)[4]
    temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
    applied = host_memory.kept()
    dispatch = jax.config.values["jax_cpu_enable_async_dispatch"]
    print(json.dumps({"applied": applied, "faults": faults, "temp": temp, "async": dispatch}))
    """
)


def _probe(opt_out: str) -> dict:
    env = {**os.environ, OPT_OUT_ENV: opt_out, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one host device is enough
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not wanted(sys.platform, __import__("platform").libc_ver()[0], "cpu", "", []),
    reason="glibc on Linux only",
)
def test_a_freed_xla_buffer_is_reused_not_faulted_in_again():
    off, on = _probe("0"), _probe("1")
    assert not off["applied"] and on["applied"]
    assert off["temp"] == on["temp"] == 64 * 2**20
    assert off["async"] and not on["async"]  # computations run on the calling thread
    pages = 64 * 2**20 / os.sysconf("SC_PAGE_SIZE")
    assert off["faults"] > 0.5 * pages  # glibc mmaps and unmaps the buffer on every call
    assert on["faults"] < 0.05 * pages  # kept in the heap and reused
