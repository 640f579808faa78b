"""The demo pipeline at CI size (configs/demo_ci.py): every stage through the real code."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from bdpo_demo import pipeline, world

pytestmark = pytest.mark.torch  # the preprocessing and evaluation stages run scorers_torch
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from configs import demo_ci

    config = demo_ci.get_config()
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
    assert sft["counts"]["read"] == sft["counts"]["written"] == 180 * d.sft_per_prompt
    assert sft["scorer_names"] == list(pipeline.SCORER_NAMES)
    assert sft["latent_shape"] == [3, 32, 32] and sft["text_shape"] == [16, 384]
    assert sft["vae_scaling_factor"] == 1.0
    # SFT records store one render twice: every scorer ties, every vote is +1
    assert sft["agreement"]["with_majority"]["per_scorer"] == {
        n: 1.0 for n in pipeline.SCORER_NAMES
    }
    pairs = _manifest(os.path.join(out, "shards", "pairs"))
    n = d.pair_prompts * d.pairs_per_prompt
    assert pairs["counts"]["read"] == pairs["counts"]["written"] == n  # ties kept (label 0)
    with open(os.path.join(out, "data", "pairs", "pairs.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == n and all(world.parse_prompt(x["prompt"]) for x in lines)


def test_every_run_trained_from_the_base_and_logged(demo_run):
    config, out, _ = demo_run
    base = _metrics(os.path.join(out, "runs", "base"))
    assert base[-1]["step"] == config.demo.base_steps
    for entry in config.demo.runs:
        name, _ = pipeline.parse_run(entry)
        workdir = os.path.join(out, "runs", name)
        rows = _metrics(workdir)
        assert rows[-1]["step"] == config.demo.dpo_steps
        assert all(np.isfinite(r["loss"]) for r in rows)
        with open(os.path.join(workdir, "config.json")) as f:
            run_config = json.load(f)
        assert run_config["model"]["init_checkpoint"].endswith(os.path.join("runs", "base"))


def test_winrate_table_has_every_run_and_metric_and_pictures_exist(demo_run):
    config, out, summary = demo_run
    runs = [pipeline.parse_run(e)[0] for e in config.demo.runs]
    for run in runs:
        for metric in pipeline.SCORER_NAMES:
            cell = summary["winrates_vs_base"][f"{run}/{metric}"]
            assert cell["n"] == config.demo.eval_prompts
            assert 0.0 <= cell["win"] + cell["tie"] <= 1.0
    text = open(os.path.join(out, "summary.md")).read()
    assert all(f"| {run} |" in text for run in runs)
    assert "| run vs base | colour | shape | position | sharpness |" in text
    for key in ("chart", "grid"):
        with PIL.Image.open(summary["files"][key]) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    images = os.listdir(os.path.join(out, "eval", "images", "base"))
    assert len(images) == config.demo.eval_prompts * config.demo.eval_seeds


def test_generator_is_deterministic_per_seed_and_shared_across_models(demo_run):
    from bdpo_demo.generator import JaxGenerator
    from scorers_torch.encoders import TEXT_ENCODERS

    config, out, _ = demo_run
    encoder = TEXT_ENCODERS.build("minilm")
    base = JaxGenerator(os.path.join(out, "runs", "base"), text_encoder=encoder,
                        steps=config.demo.sample_steps, guidance=config.demo.guidance,
                        batch_size=config.demo.sample_batch)  # fmt: skip
    prompt = world.all_specs()[0].prompt
    a = base.latents([prompt, prompt, prompt], [7, 8, 7])
    np.testing.assert_array_equal(a[0], a[2])
    assert not np.allclose(a[0], a[1])
    # the evaluation's saved PNG of (prompt 0, seed s) is what generate() makes for it
    seed = config.demo.seed * 1000
    first = pipeline.spread_prompts(config.demo.eval_prompts)[0]
    again = base.generate([first], [seed])[0]
    saved = PIL.Image.open(os.path.join(out, "eval", "images", "base", f"00000_{seed}.png"))
    # (other batch contents may move a float by an ulp: at most one uint8 step)
    diff = np.abs(np.asarray(again, np.int16) - np.asarray(saved.convert("RGB"), np.int16))
    assert diff.max() <= 1


def test_parse_run_and_bad_entries():
    assert pipeline.parse_run("b=majority-noref") == ("b", {"mode": "majority", "scorer": "",
                                                         "ref": False})  # fmt: skip
    assert pipeline.parse_run("c=single:colour")[1]["scorer"] == "colour"
    for bad in ("majority", "x=single:pickscore", "=majority"):
        with pytest.raises(ValueError, match="config.demo.runs"):
            pipeline.parse_run(bad)
