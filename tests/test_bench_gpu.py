"""bench/gpu.py at tiny size on CPU, so the GPU benchmark cannot rot before its GPU run."""

import json
import sys

import pytest

from tests.bench_runner import REPO, run_bench

pytestmark = pytest.mark.torch
pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_tiny_run_writes_every_field(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = ["bench/gpu.py", "--tiny", "--steps", "2", "--warmup", "1", "--out", str(out)]
    proc = run_bench(cmd, timeout=900)
    result = json.loads(out.read_text())
    assert result["backend"] == "cpu" and result["device_kind"]
    (model,) = result["models"]
    assert model["model"] == "tiny" and model["batch_search"][-1]["fits"]
    jax_row, torch_row = model["jax"], model["torch"]
    assert jax_row["pairs"] == 2 and jax_row["images"] == 4
    for key in ("step_seconds", "pairs_per_second", "flops_per_step", "compile_seconds"):
        assert jax_row[key] > 0, key
    assert jax_row["mfu"] is None  # no bf16 peak for a CPU: said so, not invented
    assert "no bf16 peak known" in model["peak_source"]
    assert torch_row["pairs"] == 2 and torch_row["step_seconds"] > 0
    assert "| tiny | jax | 2 |" in proc.stdout and "| tiny | torch | 2 |" in proc.stdout


def test_peak_table_matches_device_kinds():
    sys.path.insert(0, REPO)
    from bench import gpu

    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu.peak_flops("NVIDIA H200")[0] == 989e12
    assert gpu.peak_flops("cpu")[0] is None
