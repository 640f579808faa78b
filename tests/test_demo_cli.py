"""python -m bdpo_demo: flag mistakes and an unwritable --out are one line and exit code 2."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def demo_main(monkeypatch):
    # importing bdpo_demo.__main__ adds a CPU flag to XLA_FLAGS: keep it out of later tests
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    return importlib.import_module("bdpo_demo.__main__")


def test_overrides_set_typed_fields(demo_main):
    from configs import demo_ci

    config = demo_ci.get_config()
    demo_main.apply_override(config, "--config.demo.dpo_steps=7")
    demo_main.apply_override(config, "--config.demo.channels=(8, 8)")
    assert config.demo.dpo_steps == 7 and config.demo.channels == (8, 8)
    for word, flag in [("false", False), ("True", True), ("0", False), ("yes", True)]:
        demo_main.apply_override(config, f"--config.sample.use_karras_sigmas={word}")
        assert config.sample.use_karras_sigmas is flag, word  # bool("false") would be True


def test_user_errors_are_one_line_and_exit_2(demo_main, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = {
        "--seed": ["--seed", "x"],
        "--seeds 0": ["--seeds", "0"],
        "'--bogus'": ["--bogus"],
        "--config.demo.nope": ["--config.demo.nope=1"],
        "--config.nope.seed": ["--config.nope.seed=1"],
        "--config.demo.dpo_steps=many": ["--config.demo.dpo_steps=many"],
        "--config.sample.use_karras_sigmas=maybe": ["--config.sample.use_karras_sigmas=maybe"],
        "channels=(12, 16): each must be a multiple of 8": ["--config.demo.channels=(12,16)"],
        f"--out {a_file / 'out'}": ["--out", str(a_file / "out")],
    }
    for culprit, args in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            demo_main.main(["--ci", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, culprit
        assert err.count("\n") == 1 and culprit in err, err
        assert err.startswith(f"{demo_main.PROG}: error: ") and "Traceback" not in err
    with pytest.raises(demo_main.schema.UserError, match="--config.demo.nope"):  # --debug
        demo_main.main(["--config.demo.nope=1", "--debug"])
    # the real command line
    command = [sys.executable, "-m", "bdpo_demo", "--out", str(a_file / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--out" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.torch
def test_base_study_reports_base_and_render_means_at_ci_size(demo_main, tmp_path, capsys):
    pytest.importorskip("torch")
    from bdpo_demo import base_study, pipeline, report
    from configs import demo_ci

    out = str(tmp_path / "study")
    result = base_study.main(["--out", out, "--ci", "--samples", "1",
                              "--config.demo.eval_prompts=3"])  # fmt: skip
    assert result["held_out_prompts"] == 3 and result["samples_per_prompt"] == 1
    assert result["sft_steps"] == 4  # configs/demo_ci.py's base_steps, read from the base
    errors_ = result["base_standard_errors"]
    assert set(errors_) == set(report.SCORER_NAMES) and all(e >= 0 for e in errors_.values())
    rows = result["base_vs_renders"]
    assert set(rows) == set(report.SCORER_NAMES)
    for row in rows.values():
        want = (row["base_samples"] - row["flawed_renders"]) / abs(row["flawed_renders"])
        assert row["relative_difference"] == pytest.approx(want)
    assert os.path.isfile(os.path.join(out, "base_study.json"))
    with Image.open(os.path.join(out, base_study.SAMPLE_GRID_FILE)) as grid:
        # 3 prompts of 32 px enlarged 4x side by side, captions below
        assert grid.width >= 3 * 32 * base_study.GRID_SCALE
        assert grid.height > 32 * base_study.GRID_SCALE
    by_background = result["by_background"]
    assert sum(row["images"] for row in by_background.values()) == 3
    assert all(0 <= row["off_background"] <= 1 for row in by_background.values())
    printed = capsys.readouterr().out
    assert "| colour |" in printed and "| 124 |" in printed and "off background" in printed
    # the x0 probe: the noisy input's mse is the noise's, (1 - abar_t) / abar_t, by hand
    errors = result["x0_errors"]
    abar = _linear_alphas_cumprod()
    for t in base_study.PROBE_TIMESTEPS:
        want = (1 - abar[t]) / abar[t]
        assert errors[str(t)]["noisy_input_mse"] == pytest.approx(want, rel=0.03), t
        assert np.isfinite(errors[str(t)]["x0_estimate_mse"])
    assert errors["clean_sharpness"] > 0  # crisp renders: one-pixel edges
    # --base: the same base studied again, nothing trained, the same figures
    again = base_study.main(["--out", str(tmp_path / "again"), "--ci", "--samples", "1",
                             "--config.demo.eval_prompts=3", "--base", result["base"]])  # fmt: skip
    assert again["x0_errors"] == errors
    assert again["base_vs_renders"] == rows
    assert not os.path.exists(tmp_path / "again" / "shards")
    # full resolution: RGB latents at 32x32 through the identity encoder, the same study
    full = base_study.main(["--out", str(tmp_path / "full"), "--ci", "--samples", "1",
                            "--config.demo.eval_prompts=3",
                            "--config.demo.pixel_fold=1"])  # fmt: skip
    with open(os.path.join(full["base"], "unet_config.json")) as f:
        assert json.load(f)["in_channels"] == 3
    assert full["x0_errors"]["clean_sharpness"] == errors["clean_sharpness"]  # same renders
    # another resolution: the world drawn at 16 px, RGB latents at 16x16, the same study
    small = base_study.main(["--out", str(tmp_path / "small"), "--ci", "--samples", "1",
                             "--config.demo.eval_prompts=3", "--config.demo.image_size=16",
                             "--config.demo.pixel_fold=1"])  # fmt: skip
    with open(os.path.join(small["base"], "unet_config.json")) as f:
        assert json.load(f)["sample_size"] == 16
    with open(tmp_path / "small" / "shards" / "sft" / "manifest.json") as f:
        manifest = json.load(f)  # the preprocessing CLI kept the 16 px images at 16 px
    assert (manifest["resolution"], manifest["latent_shape"]) == (16, [3, 16, 16])
    with Image.open(tmp_path / "small" / "data" / "sft" / "images" / "000000_0.png") as sft:
        assert sft.size == (16, 16)
    config = demo_ci.get_config()
    config.demo.eval_prompts = 3
    prompts = pipeline.eval_prompts(config)
    want = report.render_means(prompts, config.demo.flaw_rate, 1, 0, 16)["flawed_renders"]
    assert {m: r["flawed_renders"] for m, r in small["base_vs_renders"].items()} == want
    assert small["x0_errors"]["clean_sharpness"] != errors["clean_sharpness"]  # 16 px renders
    # --base: the renders follow the base's own side, not config.demo.image_size's default
    small_again = base_study.main(["--out", str(tmp_path / "small_again"), "--ci",
                                   "--samples", "1", "--config.demo.eval_prompts=3",
                                   "--base", small["base"]])  # fmt: skip
    assert small_again["base_vs_renders"] == small["base_vs_renders"]
    for args, culprit in [
        (["--samples", "0"], "--samples 0: need at least one image"),
        (["--base", str(tmp_path / "none")], f"--base {tmp_path / 'none'}: not a trained"),
        (["--config.demo.pixel_fold=3"], "plain_levels / image_size: fold=3: the demo folds"),
        (["--config.demo.plain_levels=3"], "image_size: plain_levels=3: need 0 <="),
        (["--ci", "--config.demo.image_size=18"], "image_size: image_size=18: the UNet's 2 levels"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            base_study.main(["--out", out, *args])
        assert exit_info.value.code == 2
        assert culprit in capsys.readouterr().err


def _linear_alphas_cumprod():
    """The demo's DDPM schedule (linear betas 1e-4 .. 0.02 over 1000 steps), in float64."""
    return np.cumprod(1.0 - np.linspace(0.0001, 0.02, 1000))
