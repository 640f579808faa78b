"""Host memory on CPU: stop XLA:CPU from page-faulting its buffers in again on every call.

XLA:CPU allocates each executable's temporary buffer (162 MB for the demo UNet's
forward+backward at batch 32, 525 MB for the small one) with `posix_memalign` and frees it when
the call returns. glibc serves a request that large from a fresh `mmap` and unmaps it on free,
so every call faulted all of it in again: 40,000 minor page faults and ~70 ms of kernel time
per call of the demo UNet's forward+backward, whose wall time was ~135 ms on 2 cores
(`resource.getrusage`; PyTorch's: no faults, its tensors stay under glibc's 32 MB mmap
threshold and are reused from the heap).

Two changes, both needed (each alone left the faults as they were):
  * glibc's malloc never mmaps and never trims its heap (`mallopt(M_MMAP_MAX, 0)`,
    `mallopt(M_TRIM_THRESHOLD, -1)`), so a freed buffer stays in the heap for the next call;
  * JAX runs single-device CPU computations on the calling thread
    (`jax_cpu_enable_async_dispatch=False`) instead of a worker thread, whose own glibc arena
    cannot hold a buffer over 64 MB and would mmap it anyway. (One arena for all threads,
    `M_ARENA_MAX=1`, also stopped the faults but made both JAX's forward and PyTorch 8-15%
    slower through lock contention.)
bench/unet.py, demo UNet forward+backward: a median of 0 faults per call and 120 ms, against
41,887 faults and 144 ms with the settings off (README, Benchmarks). (A buffer freed late,
after the next call began, can still make one call in ten grow the heap once more;
tests/test_host_memory.py.)

Where it applies (`wanted`): Linux with glibc, JAX on the CPU (no GPU or TPU plugin installed,
or JAX_PLATFORMS naming cpu first), not turned off with BDPO_KEEP_FREED_MEMORY=0; and for the
malloc settings, a model small for the machine (`small_enough`: fp32 parameters at most 1/128 of
its memory). Without mmap every large allocation comes from the heap and stays there: the full
SD1.5 UNet's CPU run (README, "Real sizes"), which peaks at 20.1 GiB of this machine's 24 with
glibc's defaults, was killed for memory at 24.4 GiB with them. So:
  * `run_on_calling_thread()` sets the dispatch when `bdpo_jax.compile_options` is imported,
    before JAX's CPU client exists (it reads the setting when it is created); on its own it
    changes nothing measurable;
  * `keep_freed_memory(param_bytes)` makes the two `mallopt` calls, once per process, when the
    trainer, the sampler or a bench knows its model's size.
The price: the process does not hand freed heap memory back to the system (its resident size
stays at its peak), and Python waits for each CPU computation to end (the trainer's input
pipeline prefetches in its own threads).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import math
import os
import platform
import sys
from collections.abc import Iterable

OPT_OUT_ENV = "BDPO_KEEP_FREED_MEMORY"
# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# distributions that give JAX a non-CPU default backend
ACCELERATOR_PLUGINS = (
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "jax-rocm60-plugin",
    "jax-rocm7-plugin",
    "libtpu",
    "libtpu-nightly",
)

# keep freed memory only for models whose fp32 parameters are at most this share of the RAM
RAM_PER_PARAM_BYTE = 128

_applied: list[bool] = []


def wanted(
    system: str, libc: str, jax_platforms: str, opt_out: str, installed: Iterable[str]
) -> bool:
    """Whether to keep freed memory (a pure rule): Linux with glibc, JAX on the CPU, not
    turned off (BDPO_KEEP_FREED_MEMORY=0)."""
    if system != "linux" or libc != "glibc" or opt_out.strip() == "0":
        return False
    if jax_platforms.strip():
        return jax_platforms.split(",")[0].strip().lower() == "cpu"
    return not set(installed) & set(ACCELERATOR_PLUGINS)


@functools.cache
def _installed_plugins() -> tuple[str, ...]:
    found = []
    for name in ACCELERATOR_PLUGINS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def small_enough(param_bytes: int, ram_bytes: int) -> bool:
    """Whether a model's parameters are small enough for the heap to keep what it frees (a pure
    rule): at most 1/RAM_PER_PARAM_BYTE of the machine's memory."""
    return param_bytes * RAM_PER_PARAM_BYTE <= ram_bytes


def fp32_bytes(params) -> int:
    """4 bytes per parameter of a pytree (abstract shapes or arrays)."""
    import jax

    return 4 * sum(int(math.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _wanted_here() -> bool:
    return wanted(
        sys.platform,
        platform.libc_ver()[0],
        os.environ.get("JAX_PLATFORMS", ""),
        os.environ.get(OPT_OUT_ENV, ""),
        _installed_plugins(),
    )


def run_on_calling_thread() -> bool:
    """JAX runs single-device CPU computations on the calling thread, where `wanted`: set
    before JAX's CPU client is created. True when set."""
    if not _wanted_here():
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def keep_freed_memory(param_bytes: int) -> bool:
    """glibc never mmaps nor trims, once per process, where `wanted` and the model (fp32
    parameters `param_bytes`) is `small_enough`. True when the settings are in effect."""
    if _applied and _applied[0]:
        return True
    ok = _wanted_here() and small_enough(param_bytes, physical_memory())
    if ok:
        mallopt = ctypes.CDLL(None).mallopt
        # -1: never trim the heap's free top; 0: never mmap
        ok = mallopt(M_TRIM_THRESHOLD, -1) == 1 and mallopt(M_MMAP_MAX, 0) == 1
    _applied[:] = [ok]
    return ok


def kept() -> bool:
    """Whether `keep_freed_memory` is in effect in this process."""
    return bool(_applied and _applied[0])
