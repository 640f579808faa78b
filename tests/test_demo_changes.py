"""bdpo_demo.changes: each run's image against the base's of the same prompt and seed."""

import json

import pandas as pd
import pytest

from bdpo_demo import changes


def _scores(rows):
    return pd.DataFrame(rows, columns=["model", "prompt_id", "prompt", "seed", "metric", "score"])


def _example():
    """Base and one run, 2 prompts x 2 seeds, two measures; worked by hand below."""
    rows = []
    base = {"shape": [5.0, 6.0, 4.0, 7.0], "colour": [0.5, 0.5, 0.5, 0.5]}
    run = {"shape": [6.0, 5.0, 3.0, 7.0], "colour": [0.6, 0.7, 0.8, 0.5]}
    keys = [("00000", 0), ("00000", 1), ("00001", 0), ("00001", 1)]
    for model, values in (("base", base), ("dpo", run)):
        for metric in ("colour", "shape"):
            for (prompt_id, seed), score in zip(keys, values[metric], strict=True):
                rows.append((model, prompt_id, "p", seed, metric, score))
    return _scores(rows)


def test_paired_changes_by_hand():
    got = changes.paired_changes(_example())
    # shape changes +1, -1, -1, 0: higher 1/4, lower 2/4, mean -0.25
    assert got["dpo"]["shape"] == {"higher": 0.25, "lower": 0.5, "mean_change": -0.25, "images": 4}
    # colour changes +0.1, +0.2, +0.3, 0: higher 3/4, lower 0, mean 0.15
    colour = got["dpo"]["colour"]
    assert (colour["higher"], colour["lower"], colour["images"]) == (0.75, 0.0, 4)
    assert colour["mean_change"] == pytest.approx(0.15)
    assert list(got) == ["dpo"] and list(got["dpo"]) == ["colour", "shape"]
    table = changes.changes_table(got)
    assert "| dpo | 75 / 0 (+0.15) | 25 / 50 (-0.25) |" in table


def test_pairs_by_prompt_and_seed_not_by_row_order():
    scores = _example()
    shuffled = scores.sample(frac=1.0, random_state=0)
    assert changes.paired_changes(shuffled) == changes.paired_changes(scores)
    with pytest.raises(ValueError, match="no images of the base model"):
        changes.paired_changes(scores[scores["model"] != "base"])


def test_cli_reads_every_training_seed_and_errors_in_one_line(tmp_path, capsys):
    out = tmp_path / "demo"
    for folder in (out / "eval", out / "seed_4" / "eval"):
        folder.mkdir(parents=True)
        _example().to_parquet(folder / "scores.parquet")
    (out / "summary.json").write_text(json.dumps({"seed": 3, "train_seeds": [3, 4]}))
    result = changes.main([str(out)])
    assert set(result) == {3, 4} and result[4]["dpo"]["shape"]["lower"] == 0.5
    assert "training seed 4" in capsys.readouterr().out
    (out / "seed_4" / "eval" / "scores.parquet").unlink()
    with pytest.raises(SystemExit) as exit_info:
        changes.main([str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "seed_4" in err
    with pytest.raises(SystemExit):
        changes.main([str(tmp_path / "nowhere")])
    assert "summary.json is missing" in capsys.readouterr().err
    for text, culprit in [("{", "not JSON"), ('{"seed": 3}', "no field 'train_seeds'")]:
        (out / "summary.json").write_text(text)
        with pytest.raises(SystemExit):
            changes.main([str(out)])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and culprit in err and "summary.json" in err, err
