"""Metrics files: JSONL rows per logged step, one-off run scalars kept out of them, the
non-finite stop."""

import math

import pytest

from bdpo_jax import metrics_writer


def test_rows_rates_and_summary_scalars(tmp_path):
    writer = metrics_writer.MetricsWriter(
        str(tmp_path), total_steps=4, start_step=0, pairs_per_step=8, progress=False
    )
    writer.write_summary(0, {"compile_seconds": 1.5, "params/total": 10})
    row = writer.write(2, {"loss": 0.5, "implicit_accuracy": 0.25})
    writer.write(4, {"loss": 0.25})
    writer.close()
    assert row["images_per_sec"] == pytest.approx(2 * 8 * row["steps_per_sec"])
    rows = metrics_writer.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [2, 4]  # the summary is TensorBoard-only
    assert rows[0]["loss"] == 0.5 and "compile_seconds" not in rows[0]
    assert metrics_writer.plot_curves(str(tmp_path)).endswith(metrics_writer.CURVES_FILE)


def test_check_finite_names_the_step():
    metrics_writer.check_finite(3, 0.7)
    with pytest.raises(metrics_writer.NonFiniteLossError, match="non-finite loss inf at step 9"):
        metrics_writer.check_finite(9, math.inf)
