"""bench/common.py: alternating timing and the environment record."""

from __future__ import annotations

from bench import common


def test_time_alternating_interleaves_and_summarises():
    calls = []
    stats = common.time_alternating(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then A B / B A
    for s in stats.values():
        assert len(s["wall_s"]) == 4
        assert s["q1_s"] <= s["median_s"] <= s["q3_s"] and s["iqr_s"] >= 0


def test_environment_names_versions_cores_and_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    env = common.environment()
    assert env["cores"] >= 1 and env["cpu_model"]
    assert env["xla_flags"] == "--xla_cpu_enable_fast_math=false"
    assert {"jax", "jaxlib", "flax", "torch", "diffusers", "numpy", "python"} <= set(
        env["versions"]
    )
    assert "WARNING" in common.load_note((9.0,), (9.0,), 2)
    assert "WARNING" not in common.load_note((0.1,), (0.2,), 2)
