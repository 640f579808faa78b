"""bench/common.py: alternating timing and the environment record."""

from __future__ import annotations

import mmap

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


def test_time_alternating_counts_the_page_faults_of_each_call():
    pages = 4096

    def touch_fresh_memory():  # an anonymous mapping, touched page by page, then unmapped
        size = pages * mmap.PAGESIZE
        with mmap.mmap(-1, size) as m:
            for offset in range(0, size, mmap.PAGESIZE):
                m[offset] = 1

    stats = common.time_alternating({"fresh": touch_fresh_memory, "none": lambda: None}, 5, 1)
    assert stats["fresh"]["minor_faults_median"] >= pages
    assert stats["none"]["minor_faults_median"] < 0.01 * pages


def test_environment_names_versions_cores_and_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    env = common.environment()
    assert env["cores"] >= 1 and env["cpu_model"]
    assert env["xla_flags"] == "--xla_cpu_enable_fast_math=false"
    assert {"jax", "jaxlib", "flax", "torch", "diffusers", "numpy", "python"} <= set(
        env["versions"]
    )
    assert isinstance(env["host_memory_keep_freed"], bool)
    assert isinstance(env["jax_cpu_async_dispatch"], bool)
    assert "WARNING" in common.load_note((9.0,), (9.0,), 2)
    assert "WARNING" not in common.load_note((0.1,), (0.2,), 2)
