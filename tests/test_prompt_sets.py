"""Tests of scorers_torch.prompt_sets on small files in the published formats."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scorers_torch.prompt_sets import Prompt, detect_format, read_prompt_set


def _write_pickapic(path, captions, with_images=True):
    columns = {"caption": captions, "ranking_id": list(range(len(captions)))}
    if with_images:  # the full split carries image bytes; the no_images copy does not
        columns["jpg_0"] = [b"\xff\xd8fake"] * len(captions)
        columns["label_0"] = [0.5] * len(captions)
    pq.write_table(pa.table(columns), path)


def test_pickapic_parquet_dedupes_and_keeps_order(tmp_path):
    path = tmp_path / "validation_unique.parquet"
    _write_pickapic(path, ["a cat", "a dog", "a cat", " a bird ", "a dog"])
    prompts = read_prompt_set(path)
    assert [p.text for p in prompts] == ["a cat", "a dog", "a bird"]
    assert [p.id for p in prompts] == ["00000", "00001", "00002"]


def test_pickapic_no_images_folder_of_shards(tmp_path):
    folder = tmp_path / "pickapic_v2_no_images"
    folder.mkdir()
    _write_pickapic(folder / "validation-00000-of-00002.parquet", ["x", "y"], with_images=False)
    _write_pickapic(folder / "validation-00001-of-00002.parquet", ["y", "z"], with_images=False)
    assert detect_format(folder) == "pickapic"
    assert [p.text for p in read_prompt_set(folder)] == ["x", "y", "z"]


def test_pickapic_missing_caption_names_file_and_column(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a"]}), path)
    with pytest.raises(ValueError, match=r"bad\.parquet.*'caption'"):
        read_prompt_set(path)


PARTI = (
    "Prompt\tCategory\tChallenge\tNote\n"
    "bond\tAbstract\tBasic\tBiology-inspired concepts with multiple meanings\n"
    'A robot on a wall. The words "Fly an airplane" are written.\tOutdoor Scenes\tComplex\t\n'
    "a red cube\tIllustrations\tBasic\t\n"
)


def test_parti_tsv_keeps_category_and_quotes(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(PARTI, encoding="utf-8")
    prompts = read_prompt_set(path)
    assert prompts[0] == Prompt(
        "00000",
        "bond",
        {
            "Category": "Abstract",
            "Challenge": "Basic",
            "Note": "Biology-inspired concepts with multiple meanings",
        },
    )
    assert prompts[1].text == 'A robot on a wall. The words "Fly an airplane" are written.'
    assert prompts[1].meta["Category"] == "Outdoor Scenes"
    assert prompts[2].meta == {"Category": "Illustrations", "Challenge": "Basic", "Note": ""}
    limited = read_prompt_set(path, limit=2)
    assert [p.id for p in limited] == ["00000", "00001"]


def test_parti_without_prompt_column(tmp_path):
    path = tmp_path / "parti.tsv"
    path.write_text("Text\tCategory\nbond\tAbstract\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"parti\.tsv.*no column 'Prompt'"):
        read_prompt_set(path)


def test_hpdv2_test_json_and_benchmark_list(tmp_path):
    path = tmp_path / "test.json"
    entries = [
        {
            "prompt": "a castle on a hill",
            "image_path": ["00000.jpg", "00001.jpg"],
            "rank": [1, 2],
            "raw_annotations": [{"rank": [1, 2], "user_hash": "u"}],
        },
        {"prompt": "an astronaut", "image_path": [], "rank": [], "raw_annotations": []},
    ]
    path.write_text(json.dumps(entries), encoding="utf-8")
    assert [p.text for p in read_prompt_set(path)] == ["a castle on a hill", "an astronaut"]
    styles = tmp_path / "anime.json"
    styles.write_text(json.dumps(["p one", "p two"]), encoding="utf-8")
    assert [p.text for p in read_prompt_set(styles, format="hpdv2")] == ["p one", "p two"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"caption": "x"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: entry 0 has no string 'prompt'"):
        read_prompt_set(bad)


def test_txt_and_errors(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n  second prompt  \n", encoding="utf-8")
    assert [p.text for p in read_prompt_set(path)] == ["first prompt", "second prompt"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompt_set(tmp_path / "nope.txt")
    odd = tmp_path / "prompts.csv"
    odd.write_text("a\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts\.csv.*--prompt-format"):
        read_prompt_set(odd)
    assert read_prompt_set(odd, format="txt")[0].text == "a"
    with pytest.raises(ValueError, match="unknown prompt format 'yaml'"):
        read_prompt_set(path, format="yaml")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_set(empty)
