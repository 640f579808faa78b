"""End-to-end tests of scorers_torch.evaluate (CLI and API), generate and eval_report.

Tiny random SD pipelines (tests/tiny_pipeline.py) generate 16x16 images in 2 DDIM steps; two
cheap pixel scorers registered here stand in for PickScore & co.
"""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pandas as pd
import PIL.Image
import PIL.ImageOps
import pytest

from scorers_torch import eval_report, winrate
from scorers_torch.evaluate import main, parse_models
from scorers_torch.generate import GENERATORS, DiffusersGenerator, image_path
from scorers_torch.registry import SCORERS
from tests.tiny_pipeline import build_tiny_sd_pipeline, build_tiny_unet

pytestmark = pytest.mark.torch  # needs torch at import

CALLS = {"images": 0}  # images scored by the test scorers, to prove a rerun scores nothing


class _PixelScorer:
    """Mean of one colour channel in [0, 1] (+ offset per prompt length): cheap and exact."""

    def __init__(self, channel: int, prompt_weight: float = 0.0):
        self.name, self.channel, self.prompt_weight = "", channel, prompt_weight

    def score(self, images, prompts):
        CALLS["images"] += len(images)
        values = [
            np.asarray(image, dtype=np.float64)[..., self.channel].mean() / 255
            + self.prompt_weight * len(prompt)
            for image, prompt in zip(images, prompts, strict=True)
        ]
        return np.asarray(values, dtype=np.float32)


for _name, _channel, _weight in (("evt_red", 0, 0.0), ("evt_green", 1, 0.0), ("evt_blue", 2, 1e-3)):
    if _name not in SCORERS:
        SCORERS.register(_name)(
            lambda channel=_channel, weight=_weight: _PixelScorer(channel, weight)
        )

PROMPTS = ["a red circle on a blue background", "a photo of a cat", "an astronaut riding a horse"]
CATEGORIES = ["Illustrations", "Animals", "Animals"]
STEPS = "2"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Pipeline A, and pipeline B = A with a different random UNet."""
    root = tmp_path_factory.mktemp("pipes")
    pipe_a = build_tiny_sd_pipeline(root / "pipe_a", seed=0)
    pipe_b = build_tiny_sd_pipeline(root / "pipe_b", seed=0, unet=build_tiny_unet(seed=1))
    return pipe_a, pipe_b


def _cli_args(pipelines, prompt_file, out, scorers="evt_red,evt_blue", extra=()):
    pipe_a, pipe_b = pipelines
    return [
        "--models",
        f"base={pipe_a},same={pipe_a},other={pipe_b}",
        "--prompts",
        str(prompt_file),
        "--scorers",
        scorers,
        "--seeds",
        "2",
        "--base-seed",
        "10",
        "--steps",
        STEPS,
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--grid-prompts",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def first_run(pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prompt_file = root / "PartiPrompts.tsv"  # categories give the per-group tables
    rows = [f"{p}\t{c}\tBasic\t" for p, c in zip(PROMPTS, CATEGORIES, strict=True)]
    prompt_file.write_text("Prompt\tCategory\tChallenge\tNote\n" + "\n".join(rows) + "\n")
    out = root / "out"
    results = main(_cli_args(pipelines, prompt_file, out))
    return prompt_file, out, results


MODELS = ("base", "same", "other")
METRICS = ("evt_red", "evt_blue")


def test_scores_table_complete_and_matches_images(first_run):
    _, out, _ = first_run
    frame = pd.read_parquet(out / "scores.parquet")
    assert len(frame) == 3 * 2 * len(MODELS) * len(METRICS)
    assert not frame.duplicated(["model", "prompt_id", "seed", "metric"]).any()
    assert set(frame["seed"]) == {10, 11}
    assert set(frame["model"]) == set(MODELS)
    # Each stored score is the scorer applied to the saved PNG of its row.
    for row in frame.sample(6, random_state=0).itertuples():
        image = np.asarray(PIL.Image.open(image_path(out, row.model, row.prompt_id, row.seed)))
        channel = {"evt_red": 0, "evt_blue": 2}[row.metric]
        expected = image[..., channel].mean() / 255
        if row.metric == "evt_blue":
            expected += 1e-3 * len(PROMPTS[int(row.prompt_id)])
        assert row.score == pytest.approx(expected, abs=1e-6)
        assert row.prompt == PROMPTS[int(row.prompt_id)]


def test_seeds_shared_across_models(first_run):
    _, out, results = first_run
    base = np.asarray(PIL.Image.open(image_path(out, "base", "00001", 11)))
    same = np.asarray(PIL.Image.open(image_path(out, "same", "00001", 11)))
    other = np.asarray(PIL.Image.open(image_path(out, "other", "00001", 11)))
    seed_10 = np.asarray(PIL.Image.open(image_path(out, "base", "00001", 10)))
    assert base.shape == (16, 16, 3)
    np.testing.assert_array_equal(base, same)  # same weights + same seed -> same image
    assert np.abs(base.astype(int) - other).max() > 0
    assert np.abs(base.astype(int) - seed_10).max() > 0
    # Identical models tie on every prompt.
    same_vs_base = [r for r in results.pairs if (r.model_a, r.model_b) == ("same", "base")]
    assert {(r.wins, r.ties, r.losses) for r in same_vs_base} == {(0, 3, 0)}


def test_tables_equal_winrate_module(first_run):
    _, out, results = first_run
    frame = pd.read_parquet(out / "scores.parquet")
    best = winrate.best_of_seeds(
        frame["model"], frame["prompt_id"], frame["metric"], frame["score"], models=MODELS
    )
    expected = winrate.pairwise_win_rates(best, winrate.default_pairs(MODELS, "base"))
    assert [(r.model_a, r.model_b) for r in expected[::2]] == [
        ("same", "base"),
        ("other", "base"),
        ("same", "other"),
    ]
    with open(out / "winrates.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(expected) == 3 * len(METRICS)
    for row, result in zip(rows, expected, strict=True):
        assert (row["model_a"], row["model_b"], row["metric"]) == (
            result.model_a,
            result.model_b,
            result.metric,
        )
        assert (int(row["wins"]), int(row["ties"]), int(row["losses"])) == (
            result.wins,
            result.ties,
            result.losses,
        )
        assert float(row["win_rate"]) == pytest.approx(result.win_rate)
        assert float(row["win_rate_half_ties"]) == pytest.approx(result.win_rate_half_ties)
        assert (float(row["win_low"]), float(row["win_high"])) == pytest.approx(
            winrate.wilson_interval(result.wins, result.n)
        )
        assert row["verdict"] == winrate.verdict(result.wins, result.losses)
    markdown = (out / "winrates.md").read_text()
    other = {r.metric: r for r in expected if r.model_a == "other"}
    line = next(x for x in markdown.splitlines() if x.startswith("| other vs base |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    assert cells == [eval_report.cell_text(other[m]) for m in METRICS]
    assert eval_report.VERDICT_NOTE in markdown
    means = pd.read_csv(out / "means.csv")
    red_other = frame[(frame.model == "other") & (frame.metric == "evt_red")]
    row = means[(means.model == "other") & (means.metric == "evt_red")].iloc[0]
    assert row.mean_all == pytest.approx(red_other.score.mean())
    assert row.mean_best == pytest.approx(red_other.groupby("prompt_id").score.max().mean())


def test_group_tables_equal_winrate_on_subsets(first_run):
    _, out, _ = first_run
    frame = pd.read_parquet(out / "scores.parquet")
    groups = pd.read_csv(out / "winrates_by_group.csv", dtype={"group": str})
    assert set(zip(groups.group_field, groups.group, strict=True)) == {
        ("Category", "Animals"),
        ("Category", "Illustrations"),
        ("Challenge", "Basic"),
    }
    animals = frame[frame.prompt_id.isin(["00001", "00002"])]
    best = winrate.best_of_seeds(
        animals["model"], animals["prompt_id"], animals["metric"], animals["score"]
    )
    for r in winrate.pairwise_win_rates(best, winrate.default_pairs(MODELS, "base")):
        row = groups[
            (groups.group == "Animals")
            & (groups.model_a == r.model_a)
            & (groups.model_b == r.model_b)
            & (groups.metric == r.metric)
        ].iloc[0]
        assert (row.n_prompts, row.wins, row.ties, row.losses) == (2, r.wins, r.ties, r.losses)
    markdown = (out / "winrates_by_group.md").read_text()
    assert "## other vs base by Category: win % [95% interval] (tie %) verdict" in markdown
    assert "| Animals | 2 |" in markdown


def test_merge_tables_across_prompt_sets(first_run, tmp_path):
    _, out, results = first_run
    text = eval_report.main(
        [str(out), str(out), "--labels", "parti,again", "--out", str(tmp_path / "t.md")]
    )
    other = {r.metric: r for r in results.pairs if (r.model_a, r.model_b) == ("other", "base")}
    cells = " | ".join(eval_report.cell_text(other[m]) for m in METRICS)
    assert f"| parti: other vs base | {cells} |" in text
    assert f"| again: other vs base | {cells} |" in text
    assert (tmp_path / "t.md").read_text().strip() == text
    with pytest.raises(FileNotFoundError, match="results.json"):
        eval_report.merge_results([tmp_path])


def test_chart_and_grid_written(first_run):
    _, out, _ = first_run
    chart = PIL.Image.open(out / "winrates_vs_base.png")
    assert chart.size[0] >= 300 and chart.size[1] >= 300
    grid = PIL.Image.open(out / "grid.png")
    assert grid.size[0] == 3 * (256 + 6) + 6  # one 256 px column per model
    assert grid.size[1] > 2 * 256  # two prompt rows
    # The first column shows base's image of prompt 0 and seed 10 (the first seed), scaled up
    # 16x without smoothing: every source pixel becomes a 16x16 block
    base = np.asarray(PIL.Image.open(image_path(out, "base", "00000", 10)).convert("RGB"))
    assert base.shape == (16, 16, 3)
    cell_256 = base.repeat(16, axis=0).repeat(16, axis=1)
    grid_HxWx3 = np.asarray(grid.convert("RGB"))
    rows = [
        y
        for y in range(grid.size[1] - 256)
        if np.array_equal(grid_HxWx3[y : y + 256, 6 : 6 + 256], cell_256)
    ]
    assert len(rows) == 1


def _cli_error(capsys, argv) -> str:
    """The one stderr line of a CLI run that must end in a user error (exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("python -m scorers_torch.evaluate: error: ")
    return err


def test_rerun_resumes_without_regenerating(first_run, pipelines, capsys):
    prompt_file, out, _ = first_run
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 3 * 2 * len(MODELS)
    mtimes = {p: p.stat().st_mtime_ns for p in images}
    calls = CALLS["images"]
    main(_cli_args(pipelines, prompt_file, out))
    assert {p: p.stat().st_mtime_ns for p in images} == mtimes
    assert CALLS["images"] == calls  # nothing rescored
    # A new metric scores only its own rows; old rows are kept.
    main(_cli_args(pipelines, prompt_file, out, scorers="evt_red,evt_blue,evt_green"))
    assert CALLS["images"] == calls + 3 * 2 * len(MODELS)
    assert len(pd.read_parquet(out / "scores.parquet")) == 3 * 2 * len(MODELS) * 3
    assert {p: p.stat().st_mtime_ns for p in images} == mtimes
    # Changed sampler settings must not silently reuse old images.
    err = _cli_error(capsys, _cli_args(pipelines, prompt_file, out, extra=("--steps", "3")))
    assert "run.json: generation settings differ" in err and "steps" in err


def test_subset_reuse_and_refusals(first_run, pipelines, tmp_path, capsys):
    prompt_file, out, _ = first_run
    calls = CALLS["images"]
    subset = main(_cli_args(pipelines, prompt_file, out, extra=("--limit", "2")))
    assert CALLS["images"] == calls  # a prefix of the prompt set is all reused
    assert {r.n for r in subset.pairs} == {2}
    assert len(subset.scores) == 2 * 2 * len(MODELS) * len(METRICS)
    other = tmp_path / "other.txt"
    other.write_text("a different prompt\n")
    assert "another prompt set" in _cli_error(capsys, _cli_args(pipelines, other, out))
    argv = _cli_args(pipelines, prompt_file, tmp_path / "o2", extra=("--reference", "nope"))
    assert "--reference 'nope'" in _cli_error(capsys, argv)


def test_unet_swap_and_batch_invariance(pipelines, tmp_path):
    pipe_a, pipe_b = pipelines
    prompts, seeds = PROMPTS[:2], [3, 4]
    reference = DiffusersGenerator(str(pipe_b), steps=2, device="cpu", batch_size=2)
    expected = [np.asarray(im) for im in reference.generate(prompts, seeds)]
    # pipe_b differs from pipe_a only in its UNet: swapping it in gives pipe_b's images,
    # from a pipeline folder (unet/ subfolder) or a bare UNet folder alike, in any batching.
    shutil.copytree(pipe_b / "unet", tmp_path / "bare_unet")
    for unet in (str(pipe_b), str(tmp_path / "bare_unet")):
        swapped = DiffusersGenerator(str(pipe_a), unet=unet, steps=2, device="cpu", batch_size=1)
        for got, want in zip(swapped.generate(prompts, seeds), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(got), want)
    plain = DiffusersGenerator(str(pipe_a), steps=2, device="cpu", scheduler="dpmpp")
    assert type(plain.load().scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert plain.load().scheduler.config.algorithm_type == "dpmsolver++"
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        DiffusersGenerator(str(pipe_a), unet=str(tmp_path), device="cpu").load()
    with pytest.raises(ValueError, match="--scheduler"):
        DiffusersGenerator(str(pipe_a), scheduler="plms")


class _SolidGenerator:
    """A plugin backend (like the demo's JAX sampler): red = 37 seed + 5 len(prompt) + shift."""

    def __init__(self, path, **settings):
        self.shift, self.settings = int(path), settings

    def generate(self, prompts, seeds):
        return [
            PIL.Image.new("RGB", (8, 8), ((37 * seed + 5 * len(p) + self.shift) % 256, 0, 0))
            for p, seed in zip(prompts, seeds, strict=True)
        ]


if "evt_solid" not in GENERATORS:
    GENERATORS.register("evt_solid")(_SolidGenerator)


def test_plugin_generator_through_cli(tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("x\nyy\n")
    args = ["--prompts", str(prompt_file), "--scorers", "evt_red", "--seeds", "3"]
    args += ["--generator", "evt_solid", "--out", str(tmp_path / "out")]
    results = main(["--models", "a=0,b=100,c=250", *args])
    # Red values by hand: a: "x" 5 42 79, "yy" 10 47 84; b = a + 100; c: "x" 255 36 73,
    # "yy" 4 41 78 (mod 256). Bests: a 79 84, b 179 184, c 255 78.
    best = {m: results.best.best("evt_red", m) * 255 for m in "abc"}
    np.testing.assert_allclose(best["a"], [79, 84], atol=1e-3)
    np.testing.assert_allclose(best["c"], [255, 78], atol=1e-3)
    outcome = {(r.model_a, r.model_b): (r.wins, r.ties, r.losses) for r in results.pairs}
    assert outcome == {("b", "a"): (2, 0, 0), ("c", "a"): (1, 0, 1), ("b", "c"): (1, 0, 1)}
    single = main(["--models", "a=0", *args[:-1], str(tmp_path / "single")])
    assert single.pairs == []
    assert "Only one model" in (tmp_path / "single" / "winrates.md").read_text()


@pytest.mark.parametrize(
    "problem, culprit",
    [
        ("missing prompt file", "nope.txt"),
        ("unknown scorer", "'no_such_scorer'"),
        ("unknown backend", "'no_such_backend'"),
        ("malformed --models", "--models entry 'a'"),
        ("unknown plugin", "--plugins"),
        ("bad flag", "--seeds"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, problem, culprit):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("x\n")
    options = {
        "--models": "a=0",
        "--prompts": str(prompt_file),
        "--scorers": "evt_red",
        "--generator": "evt_solid",
        "--out": str(tmp_path / "out"),
    }
    extra = []
    if problem == "missing prompt file":
        options["--prompts"] = str(tmp_path / "nope.txt")
    elif problem == "unknown scorer":
        options["--scorers"] = "evt_red,no_such_scorer"
    elif problem == "unknown backend":
        options["--models"] = "a=0,backend=no_such_backend"
    elif problem == "malformed --models":
        options["--models"] = "a"
    elif problem == "unknown plugin":
        extra = ["--plugins", "no_such_plugin_module_xyz"]
    else:
        extra = ["--seeds", "many"]
    argv = [x for item in options.items() for x in item] + extra
    if problem == "bad flag":  # argparse's own one-line error
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert culprit in err.splitlines()[-1] and "Traceback" not in err
        return
    assert culprit in _cli_error(capsys, argv)
    assert not (tmp_path / "out" / "images").exists()  # nothing was generated


def test_parse_models():
    assert parse_models("base=runwayml/sd15,ours=exp/out,dpo=runwayml/sd15,unet=mhdang/dpo") == {
        "base": {"path": "runwayml/sd15"},
        "ours": {"path": "exp/out"},
        "dpo": {"path": "runwayml/sd15", "unet": "mhdang/dpo"},
    }
    assert parse_models("dpo=base=runwayml/sd15,unet=mhdang/dpo") == {
        "dpo": {"path": "runwayml/sd15", "unet": "mhdang/dpo"}
    }
    with pytest.raises(ValueError, match="must follow the model"):
        parse_models("unet=x,base=y")
    with pytest.raises(ValueError, match="twice"):
        parse_models("a=x,a=y")
    with pytest.raises(ValueError, match="must be NAME=PATH"):
        parse_models("a")
    with pytest.raises(ValueError, match="model name 'a/b'"):
        parse_models("a/b=x")


def test_report_helpers(tmp_path):
    assert eval_report.spread(list(range(100)), 6) == [0, 20, 40, 59, 79, 99]
    assert eval_report.spread(list("abc"), 5) == ["a", "b", "c"]
    assert eval_report.spread(list("abc"), 1) == ["a"]
    assert eval_report.metric_abbreviations(["pickscore", "hps", "clip", "aesthetic"]) == {
        "pickscore": "P",
        "hps": "H",
        "clip": "C",
        "aesthetic": "A",
    }
    assert eval_report.metric_abbreviations(["hps", "hps21", "clip"]) == {
        "hps": "Hps",
        "hps21": "Hps2",
        "clip": "C",
    }
    text = eval_report.format_scores(
        {"pickscore": 0.1897, "hps": 0.2708, "clip": 0.3686, "aesthetic": 4.486},
        {"pickscore": "P", "hps": "H", "clip": "C", "aesthetic": "A"},
    )
    assert text == "P 0.19 H 0.271 C 0.369 A 4.49"
    pairs = [winrate.PairResult("ours", "base", "hps", 4, 2, 1, 1)]
    markdown = eval_report.winrate_markdown(pairs, ["hps"], num_seeds=5)
    # Wilson 2 of 4: centre 0.5, half 1.96 / 1.9604 * sqrt(0.0625 + 0.0600) = 0.350
    assert "| ours vs base | 50.0 [15.0, 85.0] (25.0) inconclusive |" in markdown
    assert "| ours vs base | 62.50 |" in markdown
    assert "best of 5 seeds per prompt, 4 prompts" in markdown
    win = winrate.PairResult("ours", "base", "hps", 100, 60, 0, 40)
    assert eval_report.cell_text(win) == "60.0 [50.2, 69.1] (0.0) **win**"
    assert eval_report.pair_from_dict(win.as_dict()) == win
    # a small image is enlarged by whole factors without smoothing, a large one shrunk
    tiny = PIL.Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    big = eval_report.fit_cell(tiny, 128)  # factor 42 (128 // 3), padded to 128 x 128
    top, left = np.argwhere((np.asarray(big) != 255).any(-1)).min(axis=0)  # white padding
    block = np.asarray(big)[top : top + 84, left : left + 126]
    np.testing.assert_array_equal(block, np.asarray(tiny).repeat(42, 0).repeat(42, 1))
    assert eval_report.fit_cell(PIL.Image.new("RGB", (512, 512)), 256).size == (256, 256)
