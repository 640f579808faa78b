"""bench/memory.py at tiny size: the same compile-only path as its SD1.5 and SDXL rows."""

import json
import os
import sys

from tests.bench_runner import REPO, run_bench


def test_tiny_run_writes_xla_breakdown(tmp_path):
    out = tmp_path / "memory.json"
    proc = run_bench(["bench/memory.py", "--model", "tiny", "--out", str(out)], timeout=600)
    result = json.loads(out.read_text())
    assert result["meta"]["versions"]["jax"]
    (row,) = result["rows"]
    assert row["model"] == "tiny" and row["devices"] == 8 and row["attention"] == "chunked"
    assert "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED" in row["xla_flags"]
    x = row["xla_bytes_per_device"]
    assert x["argument"] > 0 and x["temp"] > 0
    assert x["peak"] == x["argument"] + x["output"] - x["alias"] + x["temp"]
    assert "| tiny (" in proc.stdout


def test_default_flags_keep_what_the_caller_set(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
    sys.path.insert(0, REPO)
    from bench import memory

    flags = memory.with_default_flags("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT")
    assert flags.count("--xla_cpu_scheduler_type") == 1 and "TYPE_DEFAULT" in flags
    assert "--xla_force_host_platform_device_count=8" in flags
    plan = {"params": 1, "ref_params": 1, "opt_state": 2, "total": 10}
    row = memory.with_plan({"xla_bytes_per_device": {"peak": 20}}, plan)
    assert row["plan_temp_bytes_per_device"] == 6 and row["plan_over_xla_peak"] == 0.5
