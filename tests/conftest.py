"""Test-wide setup: offline hub, CPU JAX with eight fake devices and rank promotion as an error
(set as environment variables before jax loads).

Compile time dominates the JAX tests on CPU, so they share a persistent compilation cache
(identical programs, e.g. the tiny trainer's step in the resume tests, compile once per
session and across xdist workers) and skip LLVM's slow optimisation passes; neither changes
a result, only how fast the tests' own tiny programs build and run.
"""

import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax_compile"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# implicit rank promotion ([B] + [B, 1] -> [B, B]) is an error in the tests: broadcast explicitly
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
