"""A CUDA GPU as a compile-only target on a machine without one (bench/memory.py --target gpu-*).

XLA's GPU compiler runs on the host: with the CUDA PJRT plugin installed (jax-cuda12-plugin,
its PTX compiler and cuDNN included with the [with-cuda] extra) and JAX_PLATFORMS=cpu, which
makes the plugin skip its driver checks, `jax.experimental.topologies.get_topology_desc(...,
"cuda", target_config=<spec>, topology="1x1x8")` gives devices of the GPU described by a
stream_executor.GpuTargetConfigProto text file (bench/gpu_specs/). A step lowered with shardings
on a mesh of them compiles to the GPU program (SPMD partitioning, GPU fusion, scheduling, buffer
assignment, PTX and cubins) without a driver; nothing can run. What such a compile does not
give: autotuning (no GPU to time kernels on: XLA picks its default gemm/conv algorithms),
`compiled.cost_analysis()` (unimplemented for a compile-only executable: `step_flops` runs XLA's
HloCostAnalysis on the unoptimised HLO instead) and cuDNN's workspace sizes (0 here).

The pure helpers (spec parsing, topology string) run without the plugin; tests/test_bench_memory.py
covers them on CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
TARGETS = {  # --target -> GpuTargetConfigProto text file under bench/gpu_specs/
    "gpu-h100": "h100_sxm_80gb.txtpb",
    "gpu-h200": "h200_sxm_141gb.txtpb",
}
PLUGIN_HINT = (
    "needs the CUDA PJRT plugin matching jax (compile only, no GPU needed): "
    "pip install 'jax-cuda12-plugin[with-cuda]==<jax version>', best in its own virtualenv"
)


def spec_path(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: expected one of {('cpu', *TARGETS)}")
    return os.path.join(SPEC_DIR, TARGETS[target])


def parse_spec(text: str) -> dict[str, Any]:
    """The fields of a GpuTargetConfigProto text this bench relies on, checked present:
    name, device memory bytes, compute capability (e.g. 9.0), platform."""
    body = re.sub(r"#[^\n]*", "", text)

    def field(name: str, pattern: str = r"(\S+)") -> str:
        m = re.search(rf"\b{name}\s*:\s*{pattern}", body)
        if m is None:
            raise ValueError(f"GPU target spec: no {name!r} field")
        return m.group(1)

    cc = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", body)
    if cc is None:
        raise ValueError("GPU target spec: no 'cuda_compute_capability { major: ... }' field")
    major = re.search(r"major\s*:\s*(\d+)", cc.group(1))
    minor = re.search(r"minor\s*:\s*(\d+)", cc.group(1))
    if major is None:
        raise ValueError("GPU target spec: cuda_compute_capability has no 'major'")
    platform = field("platform_name", r'"([^"]*)"')
    if platform != "CUDA":
        raise ValueError(f"GPU target spec: platform_name {platform!r}, expected 'CUDA'")
    return {
        "name": field("device_description_str", r'"([^"]*)"'),
        "device_memory_bytes": int(field("device_memory_size", r"(\d+)")),
        "compute_capability": float(f"{major.group(1)}.{minor.group(1) if minor else 0}"),
        "platform": platform,
    }


def topology_string(num_devices: int, gpus_per_host: int = 8) -> str:
    """get_topology_desc's topology for `num_devices` GPUs, `gpus_per_host` per host:
    '<slices>x<hosts>x<gpus per host>' (1 slice), e.g. 8 -> '1x1x8', 16 -> '1x2x8'."""
    if num_devices < 1 or gpus_per_host < 1:
        raise ValueError(f"{num_devices} devices, {gpus_per_host} per host: must be >= 1")
    per_host = min(num_devices, gpus_per_host)
    if num_devices % per_host:
        raise ValueError(f"{num_devices} devices are not whole hosts of {per_host}")
    return f"1x{num_devices // per_host}x{per_host}"


def plugin_available() -> bool:
    """Whether a CUDA PJRT plugin is installed (without importing jax)."""
    import importlib.util

    if importlib.util.find_spec("jax_plugins") is None:
        return False
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))


def topology_devices(spec_text: str, num_devices: int) -> list:
    """`num_devices` compile-only devices of the GPU `spec_text` describes."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(
            "bench", "cuda", target_config=spec_text, topology=topology_string(num_devices)
        )
    except NotImplementedError as error:  # no plugin registered the "cuda" topology
        raise RuntimeError(f"a GPU target {PLUGIN_HINT}") from error
    return list(topo.devices)


@contextlib.contextmanager
def cudnn_capability(compute_capability: float) -> Iterator[None]:
    """JAX's cuDNN attention checks the compute capability of the default backend's first GPU;
    a compile-only run has none (the default backend is the CPU), so those checks would answer
    'not Hopper' and refuse head dims over 128 (SD1.5's 160). Within this context they answer
    for the target instead (jax._src.cudnn.fused_attention_stablehlo, private; jax 0.10)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    target = (int(compute_capability), round(10 * (compute_capability % 1)))

    def parse(c: str) -> tuple[int, int]:
        major, minor = c.split(".")
        return int(major), int(minor)

    saved = fa.check_compute_capability, fa.is_cuda_compute_capability_equal
    fa.check_compute_capability = lambda c: target >= parse(c)
    fa.is_cuda_compute_capability_equal = lambda c: target == parse(c)
    try:
        yield
    finally:
        fa.check_compute_capability, fa.is_cuda_compute_capability_equal = saved


def step_flops(lowered) -> float:
    """XLA's HloCostAnalysis FLOPs of a lowered (unoptimised, unpartitioned) program, all devices
    together; the CPU backend's analysis, as the compile-only GPU executable has none."""
    import jax
    from jax._src.lib import _jax  # hlo_module_cost_analysis: no public equivalent

    module = lowered._lowering.hlo().as_hlo_module()
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return float(cost.get("flops", 0.0))
