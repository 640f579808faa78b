"""End-to-end `train_and_evaluate` on configs/tiny.py: outputs, non-finite stop, config errors,
and the command line."""

import json
import math
import os
import subprocess
import sys

import pytest

from bdpo_jax import checkpointing, metrics_writer, train
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps: int):
    config = tiny.get_config()
    config.train.steps = steps
    config.train.log_every = 2
    config.train.checkpoint_every = 100
    config.train.progress_bar = False
    return config


def test_tiny_run_outputs_then_non_finite_loss_stops_with_checkpoint_intact(tmp_path):
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(_config(4), workdir)
    assert int(state.step) == 4

    rows = metrics_writer.read_metrics(workdir)
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        for key in (
            "loss",
            "implicit_accuracy",
            "model_diff",
            "ref_diff",
            "model_mse",
            "grad_norm",
            "lr",
            "steps_per_sec",
            "images_per_sec",
            "label_zero_fraction",
        ):
            assert key in row and math.isfinite(row[key]), key
    assert rows[1]["lr"] == pytest.approx(1e-4)  # tiny: 2 warm-up steps then constant
    assert os.listdir(os.path.join(workdir, "tb")), "no TensorBoard event file"
    assert os.path.getsize(os.path.join(workdir, metrics_writer.CURVES_FILE)) > 1000
    with open(os.path.join(workdir, checkpointing.UNET_CONFIG_FILE)) as f:
        assert json.load(f)["in_channels"] == 4
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]

    # resume the same workdir with a beta that makes the loss NaN: a clear stop at step 5
    config = _config(8)
    config.dpo.beta = float("nan")
    with pytest.raises(metrics_writer.NonFiniteLossError, match="non-finite loss nan at step 5"):
        train.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
    manager = checkpointing.make_manager(workdir, keep=2)
    assert manager.latest_step() == 4
    manager.close()
    assert [r["step"] for r in metrics_writer.read_metrics(workdir)] == [2, 4]


@pytest.mark.parametrize(
    "field,value,match",
    [
        (
            "train.global_batch_size",
            12,
            "global_batch_size=12 must be divisible by the number of devices",
        ),
        ("label.mode", "best_of", "config.label.mode='best_of' is not a label mode"),
        ("data.source", "shards", "config.data.path is required"),
        ("model.prediction_type", "sample", "config.model.prediction_type='sample'"),
        ("optim.optimizer", "lion", "config.optim.optimizer='lion'"),
        ("mesh.shape", (3, 1), r"config.mesh.shape \(3, 1\) needs 3 devices"),
        ("dpo.ref_update", "swap", "config.dpo.ref_update='swap'"),
    ],
)
def test_config_errors_are_clear(tmp_path, field, value, match):
    config = _config(1)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(config, str(tmp_path))


def test_missing_data_folder_is_named(tmp_path):
    config = _config(1)
    config.data.source = "shards"
    config.data.path = str(tmp_path / "no_such_shards")
    with pytest.raises(FileNotFoundError, match="no_such_shards"):
        train.train_and_evaluate(config, str(tmp_path / "w"))


def test_command_line_parses_config_and_overrides(tmp_path):
    """The README command; --config.train.steps=0 stops at validation (no compile)."""
    cmd = [
        sys.executable,
        "-m",
        "bdpo_jax.train",
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(tmp_path),
        "--config.train.steps=0",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "config.train.steps must be >= 1, got 0" in out.stderr
    bad = subprocess.run(
        cmd[:-1] + ["--config.train.no_such_field=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode != 0 and "no_such_field" in bad.stderr
