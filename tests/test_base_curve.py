"""python -m bdpo_demo.base_curve: base studies at several SFT steps -> table, JSON, picture."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from bdpo_demo import base_curve, base_study, report

RENDERS = {"colour": 0.4, "shape": 7.0, "position": 73.0, "sharpness": -0.2}


def _write_study(folder, steps, means, standard_errors=None, renders=RENDERS, **drop):
    """A base_study.json as base_study.study writes it (the fields the curve reads)."""
    os.makedirs(folder, exist_ok=True)
    rows = {}
    for m in report.SCORER_NAMES:
        relative = (means[m] - renders[m]) / abs(renders[m])
        rows[m] = {"flawed_renders": renders[m], "base_samples": means[m],
                   "relative_difference": relative,
                   "within_tolerance": abs(relative) <= report.BASE_TOLERANCE}  # fmt: skip
    study = {
        "base": f"{folder}/runs/base",
        "sft_steps": steps,
        "base_vs_renders": rows,
        "base_standard_errors": standard_errors or {m: 0.01 for m in report.SCORER_NAMES},
    }
    for key in drop:
        del study[key]
    with open(os.path.join(folder, base_curve.STUDY_FILE), "w") as f:
        json.dump(study, f)
    return str(folder)


def test_prompt_standard_errors_by_hand():
    # per-prompt means 2, 2, 6: sd (ddof 1) sqrt(16/3), / sqrt(3 prompts) = 4/3
    prompts = ["a", "a", "b", "b", "c", "c"]
    scores = {"colour": np.array([1.0, 3.0, 2.0, 2.0, 6.0, 6.0])}
    assert base_study.prompt_standard_errors(prompts, scores) == {"colour": pytest.approx(4 / 3)}
    # one image per prompt: the usual standard error of the mean
    values = np.array([0.1, 0.5, 0.2, 0.9])
    got = base_study.prompt_standard_errors(list("wxyz"), {"shape": values})["shape"]
    assert got == pytest.approx(stats.sem(values))


def test_per_doubling_is_the_least_squares_slope_on_log2_steps():
    steps = [1000, 2000, 4000, 8000, 16000]
    rng = np.random.default_rng(0)
    rows = []
    for s in steps:
        noise = rng.normal(0, 0.01)
        rows.append({"sft_steps": s, **{m: {"mean": -0.7 + 0.05 * np.log2(s / 1000) + noise}
                                        for m in report.SCORER_NAMES}})  # fmt: skip
    fit = stats.linregress(np.log2(steps), [r["sharpness"]["mean"] for r in rows])
    got = base_curve.per_doubling(rows)["sharpness"]
    assert got["slope"] == pytest.approx(fit.slope) and got["standard_error"] == pytest.approx(
        fit.stderr
    )
    assert abs(got["slope"] - 0.05) < 0.02
    two = base_curve.per_doubling(rows[:2])["colour"]  # a line through two points, no error
    want = rows[1]["colour"]["mean"] - rows[0]["colour"]["mean"]
    assert two["slope"] == pytest.approx(want) and np.isnan(two["standard_error"])


def test_curve_cli_writes_table_json_and_picture(tmp_path, capsys):
    means = {
        1000: {"colour": 0.30, "shape": 5.0, "position": 60.0, "sharpness": -0.65},
        4000: {"colour": 0.42, "shape": 6.2, "position": 80.0, "sharpness": -0.52},
        2000: {"colour": 0.36, "shape": 5.5, "position": 68.0, "sharpness": -0.58},
    }
    studies = [_write_study(tmp_path / f"s{s}", s, m) for s, m in means.items()]
    studies[1] = os.path.join(studies[1], base_curve.STUDY_FILE)  # a file works as a folder does
    out = str(tmp_path / "curve")
    result = base_curve.main(["--out", out, *studies])
    assert [r["sft_steps"] for r in result["bases"]] == [1000, 2000, 4000]  # sorted
    row = result["bases"][2]["shape"]
    assert row["mean"] == 6.2 and row["relative_difference"] == pytest.approx(-0.8 / 7.0)
    assert row["within_tolerance"] and not result["bases"][0]["shape"]["within_tolerance"]
    with open(os.path.join(out, base_curve.CURVE_JSON)) as f:
        assert json.load(f)["per_doubling"]["colour"]["slope"] == pytest.approx(0.06)
    with Image.open(os.path.join(out, base_curve.CURVE_PNG)) as picture:
        assert picture.width > 4 * 200
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    printed = capsys.readouterr().out
    assert "| flawed renders | 0.4 | 7 | 73 | -0.2 |" in printed
    assert "| 4000 | 0.42 +- 0.01 (+5%) | 6.2 +- 0.01 (-11%) |" in printed
    assert "| 1000 | 0.3 +- 0.01 (-25%, **outside**)" in printed


def test_curve_cli_refuses_studies_it_cannot_compare(tmp_path, capsys):
    m = {"colour": 0.3, "shape": 5.0, "position": 60.0, "sharpness": -0.6}
    good = _write_study(tmp_path / "good", 1000, m)
    old = _write_study(tmp_path / "old", 2000, m, sft_steps=1, base_standard_errors=1)
    other = _write_study(tmp_path / "other", 4000, m, renders={**RENDERS, "shape": 6.0})
    twin = _write_study(tmp_path / "twin", 1000, m)
    (tmp_path / "bad.json").write_text("{not json")
    for studies, culprit in [
        ([old], "old/base_study.json: no sft_steps / base_standard_errors (written before"),
        ([old], f"--base {tmp_path / 'old'}/runs/base"),
        ([good, other], "other/base_study.json: its flawed renders score 6 in shape"),
        ([good, twin], "twin/base_study.json: 1000 SFT steps, as"),
        ([str(tmp_path / "none")], "none: not found"),
        ([str(tmp_path / "bad.json")], "bad.json: not a readable base study"),
        ([good, "--out", str(tmp_path / "bad.json")], "bad.json: cannot write there"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            base_curve.main(["--out", str(tmp_path / "curve"), *studies])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert culprit in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "curve" / base_curve.CURVE_PNG)  # nothing half-written
