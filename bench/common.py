"""Shared helpers of the JAX-vs-PyTorch benches: fair timing, the environment record, tables.

Fairness rules every bench follows (bench/unet.py, bench/train_step.py):
  * both frameworks run in the same process, ALTERNATING (round r runs every contender once,
    the order reversed on odd rounds), after untimed warm-up calls, so a change in machine load
    hits all of them alike;
  * each contender reports the median and the interquartile range of its wall times, and the
    median process CPU time (both frameworks' threads spin while waiting, so CPU time above
    threads x wall means contention, not work);
  * the load average before and after, thread counts, library versions, the CPU model, the
    XLA_FLAGS in effect and whether the package's malloc settings (bdpo_jax.host_memory) are on
    go into the JSON next to the numbers, and each contender's minor page faults per call.

PyTorch is set up as a PyTorch user would for speed on CPU (``setup_torch``): flush denormals,
one intra-op thread per core. Its OpenMP threads collapse when the cores are shared: the small
UNet forward took 3.5 s with 2 threads vs 0.58 s with 1 thread at load average 6 on 2 cores
(0.19 s idle); a run whose load average exceeds the core count is flagged in the table.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata

LIBRARIES = ("jax", "jaxlib", "flax", "torch", "diffusers", "numpy")


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def setup_torch(threads: int = 0) -> dict:
    """Speed settings of a PyTorch CPU user: denormals flushed, ``threads`` (0: one per core)."""
    import torch

    torch.set_flush_denormal(True)
    torch.set_num_threads(threads or cores())
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_flush_denormal": True,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a reader needs to judge a timing: machine, load, threads, versions, XLA flags."""
    import jax

    from bdpo_jax import compile_options, host_memory

    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    versions["python"] = platform.python_version()
    return {
        "cpu_model": cpu_model(),
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "jax_device": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_compiler_options": compile_options.compiler_options(),  # what the package's jit sets
        # JAX runs CPU computations on the calling thread (set on importing compile_options)
        # and glibc malloc keeps freed memory (no mmap, no trim; set for the bench's models as
        # the trainer sets it for its own), for both frameworks in this process
        "host_memory_keep_freed": host_memory.kept(),
        "jax_cpu_async_dispatch": jax.config.values["jax_cpu_enable_async_dispatch"],
        # XLA:CPU sizes its intra-op pool to the cores; these variables cap other pools
        "thread_env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
            if k in os.environ
        },
        "versions": versions,
        "argv": sys.argv,
    }


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def time_alternating(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, dict]:
    """Times each blocking callable ``repeats`` times, interleaved; seconds.

    Returns, per name: median_s, q1_s, q3_s, iqr_s, min_s, cpu_median_s (process CPU time during
    the call), minor_faults_median (the process's minor page faults during the call: memory
    the allocator handed back to the system and touched again) and the raw wall times.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    faults = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            contenders[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    out = {}
    for n in names:
        q1, q2, q3 = _quantiles(wall[n])
        out[n] = {
            "median_s": q2,
            "q1_s": q1,
            "q3_s": q3,
            "iqr_s": q3 - q1,
            "min_s": min(wall[n]),
            "cpu_median_s": statistics.median(cpu[n]),
            "minor_faults_median": statistics.median(faults[n]),
            "wall_s": wall[n],
        }
    return out


def load_note(load_before: tuple, load_after: tuple, n_cores: int) -> str:
    """One line about the machine's load during a run (a warning when it was busy)."""
    worst = max(load_before[0], load_after[0])
    text = f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    if worst > 0.5 * n_cores:
        text += f"  WARNING: busy machine ({n_cores} cores): timings are not clean"
    return text


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def fmt_ms(stats: dict) -> str:
    """'median ±IQR/2' in ms."""
    return f"{1000 * stats['median_s']:.1f} ±{500 * stats['iqr_s']:.1f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table (right-aligned numbers)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) + " |")


# The "small" benchmark UNet (17.8M params at cross_attention_dim 128): the SD1.5 block layout
# at 3 levels and 64-256 channels; bench/unet.py, bench/train_step.py and bench/dpo_signal.py
# apply it on top of presets.tiny_unet_config("sd15", ...)
SMALL_UNET = {
    "block_out_channels": [64, 128, 256],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 32,
    "attention_head_dim": 4,
    "layers_per_block": 2,
}


SD_VAE_SCALING = 0.18215  # SD1.5's VAE scaling factor, used by every synthetic SD-like batch


def random_moments(rng, pairs: int, channels: int, side: int, dtype) -> object:
    """[pairs, 2, C, side, side] VAE moments in the shards' layout: a mean whose scaled latent
    has unit variance and logvar -6 (numpy `rng`: draws the same numbers for the same calls)."""
    import numpy as np

    mean = rng.standard_normal((pairs, 1, channels, side, side)) / SD_VAE_SCALING
    return np.concatenate([mean, np.full_like(mean, -6.0)], axis=1).astype(dtype)


def synthetic_info(latent_shape: tuple, text_shape: tuple, pooled_dim: int = 0):
    """DatasetInfo of a synthetic 4-scorer SD-like batch (no shards behind it)."""
    import numpy as np

    from bdpo_jax import data

    return data.DatasetInfo(
        scorer_names=tuple(f"s{k}" for k in range(4)),
        latent_shape=tuple(latent_shape),
        text_shape=tuple(text_shape),
        pooled_dim=pooled_dim or None,
        views=1,
        vae_scaling_factor=SD_VAE_SCALING,
        num_records=0,
        score_mean=np.zeros(4, np.float32),
        score_std=np.ones(4, np.float32),
        empty_text_embeds=np.zeros(text_shape, np.float16),
        empty_pooled_text_embeds=np.zeros(pooled_dim, np.float16) if pooled_dim else None,
    )
