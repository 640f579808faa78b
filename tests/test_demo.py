"""The demo pipeline at CI size (configs/demo_ci.py) with two training seeds: every stage
through the real code, held-out evaluation, the summary's tables, and a rerun that repeats
them exactly."""

import copy
import json
import os

import numpy as np
import PIL.Image
import pytest

from bdpo_demo import pipeline, report, world

pytestmark = pytest.mark.torch  # the preprocessing and evaluation stages run scorers_torch
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from configs import demo_ci

    config = demo_ci.get_config()
    config.demo.train_seeds = 2  # the --seeds machinery: one base, pairs + runs twice
    out = str(tmp_path_factory.mktemp("demo"))
    summary = pipeline.run(config, out, compilation_cache=False)
    return config, out, summary


def _manifest(folder: str) -> dict:
    (name,) = [f for f in os.listdir(folder) if f.startswith("manifest") and f.endswith(".json")]
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_shards_hold_every_rendered_and_sampled_pair(demo_run):
    config, out, _ = demo_run
    d = config.demo
    sft = _manifest(os.path.join(out, "shards", "sft"))
    train, heldout = world.split_specs()
    assert sft["counts"]["read"] == sft["counts"]["written"] == len(train) * d.sft_per_prompt
    assert sft["scorer_names"] == list(pipeline.SCORER_NAMES)
    assert sft["latent_shape"] == [12, 16, 16] and sft["text_shape"] == [16, 384]
    assert sft["vae_scaling_factor"] == 1.0
    # SFT records store one render twice: every scorer ties, every vote is +1
    assert sft["agreement"]["with_majority"]["per_scorer"] == {
        n: 1.0 for n in pipeline.SCORER_NAMES
    }
    n = d.pair_prompts * d.pairs_per_prompt
    train_prompts = {spec.prompt for spec in train}
    pair_images = []
    for seed in summary_seeds(config):
        folder = pipeline.seed_dir(out, config, seed)
        pairs = _manifest(os.path.join(folder, "shards", "pairs"))
        assert pairs["counts"]["read"] == pairs["counts"]["written"] == n  # ties kept (label 0)
        with open(os.path.join(folder, "data", "pairs", "pairs.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        assert len(lines) == n and {x["prompt"] for x in lines} <= train_prompts
        with PIL.Image.open(os.path.join(folder, "data", "pairs", lines[0]["image_0"])) as im:
            pair_images.append(np.asarray(im))
    assert not np.array_equal(*pair_images)  # each training seed samples its own pairs
    # evaluation prompts are held out: in neither the SFT nor the pair data
    with open(os.path.join(out, "data", "sft", "sft.jsonl")) as f:
        sft_prompts = {json.loads(line)["prompt"] for line in f}
    evaluated = set(pipeline.eval_prompts(config))
    assert len(evaluated) == d.eval_prompts and not evaluated & (sft_prompts | train_prompts)
    assert evaluated <= {spec.prompt for spec in heldout}


def summary_seeds(config) -> list[int]:
    return [config.demo.seed, config.demo.seed + 1]


def test_every_run_trained_from_the_base_and_logged(demo_run):
    config, out, _ = demo_run
    base = _metrics(os.path.join(out, "runs", "base"))
    assert base[-1]["step"] == config.demo.base_steps
    for seed in summary_seeds(config):
        for entry in config.demo.runs:
            name, _ = pipeline.parse_run(entry)
            workdir = os.path.join(pipeline.seed_dir(out, config, seed), "runs", name)
            rows = _metrics(workdir)
            assert rows[-1]["step"] == config.demo.dpo_steps
            assert all(np.isfinite(r["loss"]) for r in rows)
            with open(os.path.join(workdir, "config.json")) as f:
                run_config = json.load(f)
            assert run_config["model"]["init_checkpoint"] == os.path.join(out, "runs", "base")
            assert run_config["seed"] == seed


def test_summary_has_every_cell_per_seed_with_interval_and_verdict(demo_run):
    from scorers_torch import winrate

    config, out, summary = demo_run
    runs = [pipeline.parse_run(e)[0] for e in config.demo.runs]
    seeds = summary_seeds(config)
    assert summary["train_seeds"] == seeds
    for run in runs:
        for metric in pipeline.SCORER_NAMES:
            cell = summary["winrates_vs_base"][f"{run}/{metric}"]
            assert set(cell["per_seed"]) == {str(s) for s in seeds}
            for c in cell["per_seed"].values():
                assert c["n"] == config.demo.eval_prompts == c["wins"] + c["ties"] + c["losses"]
                assert c["win"] == c["wins"] / c["n"] and c["tie"] == c["ties"] / c["n"]
                assert (c["win_low"], c["win_high"]) == winrate.wilson_interval(c["wins"], c["n"])
                assert c["verdict"] == winrate.verdict(c["wins"], c["losses"])
            wins = [c["win"] for c in cell["per_seed"].values()]
            assert cell["mean_win"] == pytest.approx(np.mean(wins))
            assert (cell["min_win"], cell["max_win"]) == (min(wins), max(wins))
            assert sum(cell["verdicts"].values()) == len(seeds)
    means = summary["mean_scores"]
    for kind in ("clean_renders", "flawed_renders", "base_samples"):
        assert set(means[kind]) == set(pipeline.SCORER_NAMES)
    assert means["clean_renders"]["position"] > 95.0  # perfect renders top the scales
    assert set(means["runs"][runs[0]]["per_seed"]) == {str(s) for s in seeds}
    text = open(os.path.join(out, "summary.md")).read()
    assert all(f"| {run} |" in text for run in runs)
    assert "| run vs base | colour | shape | position | sharpness |" in text
    assert "### Training seed 1" in text and "| perfect renders |" in text
    assert "Wilson interval of wins / (wins + losses)" in text
    for key in ("chart", "grid"):
        with PIL.Image.open(summary["files"][key]) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    for seed in seeds:  # the base is sampled once; the other seeds' folders copy its images
        folder = os.path.join(pipeline.seed_dir(out, config, seed), "eval", "images", "base")
        assert len(os.listdir(folder)) == config.demo.eval_prompts * config.demo.eval_seeds
    with PIL.Image.open(summary["files"]["grid"]) as grid:  # 4x cells: base + balanced
        assert grid.size[0] == 2 * (4 * 32 + 6) + 6


def test_generator_is_deterministic_per_seed_and_shared_across_models(demo_run):
    from scorers_torch.encoders import TEXT_ENCODERS

    config, out, _ = demo_run
    encoder = TEXT_ENCODERS.build("minilm")
    base = pipeline.make_generator(os.path.join(out, "runs", "base"), config, encoder)
    prompt = world.all_specs()[0].prompt
    a = base.latents([prompt, prompt, prompt], [7, 8, 7])
    np.testing.assert_array_equal(a[0], a[2])
    assert not np.allclose(a[0], a[1])
    # the evaluation's saved PNG of (prompt 0, seed s) is what generate() makes for it
    seed = config.demo.seed * 1000
    first = pipeline.eval_prompts(config)[0]
    again = base.generate([first], [seed])[0]
    saved = PIL.Image.open(os.path.join(out, "eval", "images", "base", f"00000_{seed}.png"))
    # (other batch contents may move a float by an ulp: at most one uint8 step)
    diff = np.abs(np.asarray(again, np.int16) - np.asarray(saved.convert("RGB"), np.int16))
    assert diff.max() <= 1


def test_generator_takes_the_sampler_from_the_config_not_the_workdir(demo_run):
    """Karras sigmas are an inference choice: `make_generator` applies the config's, and a
    plain JaxGenerator keeps the one the workdir was trained with."""
    from bdpo_demo.generator import JaxGenerator
    from scorers_torch.encoders import TEXT_ENCODERS

    config, out, _ = demo_run
    workdir = os.path.join(out, "runs", "base")
    encoder = TEXT_ENCODERS.build("minilm")
    assert config.sample.use_karras_sigmas  # the demo's sampler
    assert JaxGenerator(workdir, text_encoder=encoder).schedule.use_karras_sigmas
    other = copy.deepcopy(config)
    other.sample.use_karras_sigmas = False
    plain = pipeline.make_generator(workdir, other, encoder)
    assert not plain.schedule.use_karras_sigmas
    karras = pipeline.make_generator(workdir, config, encoder)
    prompt = world.all_specs()[0].prompt
    assert not np.allclose(plain.latents([prompt], [3]), karras.latents([prompt], [3]))


def test_rerun_repeats_the_tables_exactly(demo_run, tmp_path):
    """The same command and seed on the same machine gives the same table: stages 3-5 of the
    first training seed again (pairs from the base, DPO, evaluation) into a fresh folder."""
    from bdpo_demo import plugins  # noqa: F401  (registers 'minilm')
    from scorers_torch.encoders import TEXT_ENCODERS

    config, out, summary = demo_run
    config = copy.deepcopy(config)
    config.demo.train_seeds = 1
    seed, base = config.demo.seed, os.path.join(out, "runs", "base")
    encoder = TEXT_ENCODERS.build("minilm")
    pair_manifest = pipeline.stage_pairs(config, str(tmp_path), base, encoder, seed)
    unet_config = os.path.join(out, "unet_config.json")
    runs = pipeline.stage_dpo(config, str(tmp_path), unet_config, base, {}, seed)
    results = pipeline.evaluate_seeds(config, str(tmp_path), base, {seed: runs}, encoder, {})
    again = report.build_summary(
        config, results, list(runs), pipeline.eval_prompts(config),
        {"counts": summary["sft_counts"]}, {seed: pair_manifest}, {},
    )  # fmt: skip

    def text(value):  # JSON text: NaN (every prompt tied) compares equal to itself
        return json.dumps(value, sort_keys=True)

    assert again["pair_counts"][str(seed)] == summary["pair_counts"][str(seed)]
    for key, cell in summary["winrates_vs_base"].items():
        assert text(again["winrates_vs_base"][key]["per_seed"]) == text(
            {str(seed): cell["per_seed"][str(seed)]}
        )
    means, means_again = summary["mean_scores"], again["mean_scores"]
    for kind in ("clean_renders", "flawed_renders", "base_samples"):
        assert means_again[kind] == means[kind]
    for run in runs:
        assert (
            means_again["runs"][run]["per_seed"][str(seed)]
            == (means["runs"][run]["per_seed"][str(seed)])
        )
    for name in ("winrates.csv", "means.csv"):
        first = open(os.path.join(out, "eval", name)).read()
        assert first == open(os.path.join(tmp_path, "eval", name)).read()
    with open(os.path.join(out, "summary.json")) as f:  # what a script reads back
        assert text(report.tables(json.load(f))) == text(report.tables(summary))


def test_parse_run_and_bad_entries():
    assert pipeline.parse_run("b=majority-noref") == ("b", {"mode": "majority", "scorer": "",
                                                         "ref": False, "lora": False})  # fmt: skip
    assert pipeline.parse_run("l=majority-noref-lora")[1] == {
        "mode": "majority", "scorer": "", "ref": False, "lora": True}  # fmt: skip
    assert pipeline.parse_run("c=single:colour")[1]["scorer"] == "colour"
    for bad in ("majority", "x=single:pickscore", "=majority"):
        with pytest.raises(ValueError, match="config.demo.runs"):
            pipeline.parse_run(bad)


def test_base_vs_renders_worked_example():
    means = {
        "flawed_renders": {"colour": 0.4, "shape": 6.0, "position": 70.0, "sharpness": -0.2},
        "base_samples": {"colour": 0.3, "shape": 6.6, "position": 70.0, "sharpness": -0.23},
    }
    got = report.base_vs_renders(means)
    assert got["colour"]["relative_difference"] == pytest.approx(-0.25)
    assert got["shape"]["relative_difference"] == pytest.approx(0.1)
    assert got["sharpness"]["relative_difference"] == pytest.approx(-0.15)  # -0.03 / |-0.2|
    within = {m: c["within_tolerance"] for m, c in got.items()}
    assert within == {"colour": False, "shape": True, "position": True, "sharpness": True}
    table = report.base_table({"base_vs_renders": got})
    assert "| colour | 0.4 | 0.3 | -25.0% | **outside** |" in table
