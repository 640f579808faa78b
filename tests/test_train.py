"""End-to-end `train_and_evaluate` on configs/tiny.py: outputs, non-finite stop, config errors,
and the command line."""

import json
import math
import os
import subprocess
import sys

import pytest

from bdpo_jax import checkpointing, metrics_writer, train, train_state
from bdpo_jax.models import presets
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps: int):
    config = tiny.get_config()
    config.train.steps = steps
    config.train.log_every = 2
    config.train.checkpoint_every = 100
    config.train.progress_bar = False
    return config


def test_tiny_run_outputs_then_non_finite_loss_stops_with_checkpoint_intact(tmp_path, monkeypatch):
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
    # step 1 ran at policy == reference: its median |inside| (0 in exact arithmetic, rounding
    # noise otherwise: 0 or ~3e-5 here, by how XLA fused this compile) is on the first row
    assert 0.0 <= rows[0]["ref_refresh_abs_inside_median"] < 1e-3
    assert "ref_refresh_abs_inside_median" not in rows[1]
    assert os.listdir(os.path.join(workdir, "tb")), "no TensorBoard event file"
    assert os.path.getsize(os.path.join(workdir, metrics_writer.CURVES_FILE)) > 1000
    with open(os.path.join(workdir, checkpointing.UNET_CONFIG_FILE)) as f:
        assert json.load(f)["in_channels"] == 4
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]

    # resume the same workdir with a beta that makes the loss NaN: a clear stop at step 5 (a
    # changed beta is refused on resume, tests/test_checkpointing.py; let it through here)
    monkeypatch.setattr(train, "check_resume_config", lambda *args: None)
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
        ("model.prediction_type", "x0", "config.model.prediction_type='x0'"),
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,data_fields,config_fields",
    [
        # 5 time ids (original size, crop, aesthetic score): projection P + 5 x 8
        ("sdxl_refiner", {"synthetic_pooled_dim": 16, "synthetic_num_time_ids": 5},
         {"projection_class_embeddings_input_dim": 16 + 5 * presets.TINY_SDXL_TIME_EMBED_DIM}),
        # timestep_cond left out (diffusers allows it); its projection is still trained/exported
        ("lcm", {}, {"time_cond_proj_dim": presets.TINY_TIME_COND_PROJ_DIM}),
        # text embeddings of width encoder_hid_dim, projected to cross_attention_dim
        ("kolors", {"synthetic_pooled_dim": 16},
         {"encoder_hid_dim": 32, "cross_attention_dim": presets.TINY_KOLORS_INNER_DIM}),
    ],
)  # fmt: skip
def test_one_step_and_export_of_each_new_tiny_family(tmp_path, family, data_fields, config_fields):
    from bdpo_jax import export

    config = _config(1)
    config.model.unet_config = f"tiny:{family}"
    for name, value in data_fields.items():
        config.data[name] = value
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 1
    assert math.isfinite(metrics_writer.read_metrics(workdir)[-1]["loss"])
    out = export.export(workdir, tmp_path / "unet")  # verifies every tensor it writes
    with open(out / "config.json") as f:
        written = json.load(f)
    for name, value in config_fields.items():
        assert written[name] == value, name


def test_real_config_names_resolve():
    shapes = dict(latent_shape=(4, 64, 64), text_shape=(77, 768), pooled_dim=None)
    for name in presets.REAL_CONFIGS:
        assert train_state.resolve_unet_config(name, **shapes) == presets.real_unet_config(name)
    with pytest.raises(ValueError, match="'kolors2'.*lcm_sd15"):
        train_state.resolve_unet_config("kolors2", **shapes)


def test_missing_data_folder_is_named(tmp_path):
    config = _config(1)
    config.data.source = "shards"
    config.data.path = str(tmp_path / "no_such_shards")
    with pytest.raises(FileNotFoundError, match="no_such_shards"):
        train.train_and_evaluate(config, str(tmp_path / "w"))


def _cli(tmp_path, *flags):
    cmd = [sys.executable, "-m", "bdpo_jax.train", "--config", "configs/tiny.py"]
    cmd += ["--workdir", str(tmp_path / "w"), *flags]
    env = {k: v for k, v in os.environ.items() if k != "BDPO_DEBUG"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "flags,culprit",
    [
        (["--config.train.stepz=3"], "--config.train.stepz=3"),  # absl / ml_collections
        (["--config.data.source=shards", "--config.data.path={tmp}/no_such_shards"],
         "no_such_shards"),
        (["--config.label.mode=majorty"], "config.label.mode='majorty'"),
        (["--config.label.mode=single", "--config.label.scorer=hps"], "config.label.scorer='hps'"),
        (["--config.optim.grad_accum_steps=3"], "config.optim.grad_accum_steps=3"),
    ],
)  # fmt: skip
def test_command_line_user_errors_are_one_line_and_exit_2(tmp_path, flags, culprit):
    """Every error is raised before anything compiles; a traceback only with --debug."""
    out = _cli(tmp_path, *[f.format(tmp=tmp_path) for f in flags])
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("bdpo_jax.train: error: "), out.stderr
    assert culprit in lines[0]


def test_command_line_debug_shows_the_traceback(tmp_path):
    out = _cli(tmp_path, "--config.label.mode=majorty", "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_command_line_parses_config_and_overrides(tmp_path):
    """The README command; --config.train.steps=0 stops at validation (no compile)."""
    out = _cli(tmp_path, "--config.train.steps=0")
    assert out.returncode == 2
    assert "config.train.steps must be >= 1, got 0" in out.stderr
    bad = _cli(tmp_path, "--config.train.no_such_field=1")
    assert bad.returncode == 2 and "no_such_field" in bad.stderr
