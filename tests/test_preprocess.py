"""The preprocessing CLI end to end on a Pick-a-Pic-schema parquet made by the test."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bdpo_jax import schema
from scorers_torch import inputs, preprocess, shard_writer
from scorers_torch.registry import SCORERS
from tests.scorer_fixtures import tiny_hf_clip
from tests.tiny_pipeline import build_clip_tokenizer, build_tiny_text_encoder, build_tiny_vae

pytestmark = pytest.mark.torch  # needs torch at import

ROOT = Path(__file__).resolve().parents[1]
NUM_PAIRS, CORRUPT, TIE = 12, 3, 5  # pair 3 has an undecodable image_1, pair 5 two equal images
PLUGIN = textwrap.dedent(
    """
    import os, signal
    import numpy as np
    from scorers_torch.registry import SCORERS

    class Brightness:
        calls = 0
        def score(self, images, prompts):
            Brightness.calls += 1
            if Brightness.calls == int(os.environ.get("C2_KILL_AT_CALL", "0")):
                os.kill(os.getpid(), signal.SIGKILL)  # a hard kill in the middle of a shard
            return np.array([np.asarray(i, np.float32).mean() for i in images], np.float32)

    @SCORERS.register("c2_brightness")
    def build(**_):
        return Brightness()
    """
)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(24, 48)), int(rng.integers(24, 48))
    image = PIL.Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    box = sorted(rng.integers(0, min(w, h), 2).tolist())
    PIL.ImageDraw.Draw(image).ellipse(
        [box[0], box[0], box[1] + 2, box[1] + 2],
        fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
    )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("preprocess")
    base = root / "base"
    build_clip_tokenizer(root / "src").save_pretrained(base / "tokenizer")
    text_encoder = build_tiny_text_encoder(seed=1)
    text_encoder.save_pretrained(base / "text_encoder")
    vae = build_tiny_vae(seed=2)
    vae.save_pretrained(base / "vae")
    labels = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
    rows = []
    for i in range(NUM_PAIRS):
        jpg_0, jpg_1 = _jpeg(2 * i), _jpeg(2 * i + 1)
        jpg_1 = b"not a jpeg" if i == CORRUPT else jpg_0 if i == TIE else jpg_1
        label_0, label_1 = labels[i % 3]
        rows.append(
            {"ranking_id": 1000 + i, "caption": f"a shape number {i}", "jpg_0": jpg_0,
             "jpg_1": jpg_1, "label_0": label_0, "label_1": label_1, "user_id": 7}
        )  # fmt: skip
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.slice(0, 7), root / "train-0.parquet", row_group_size=3)
    pq.write_table(table.slice(7), root / "train-1.parquet", row_group_size=3)
    (root / "plugin_c2.py").write_text(PLUGIN)
    config = root / "scorers.json"
    clip = tiny_hf_clip(root / "clip")
    config.write_text(json.dumps({"clip": {"backend": "transformers", "model": str(clip),
                                           "device": "cpu"}}))  # fmt: skip
    sys.path.insert(0, str(root))  # the plugin module, removed again at teardown
    yield {"root": root, "base": base, "vae": vae, "text_encoder": text_encoder, "rows": rows,
           "config": config}  # fmt: skip
    sys.path.remove(str(root))


def _argv(world, out, *extra):
    return [
        "--input", f"{world['root']}/train-*.parquet", "--format", "pickapic", "--out", str(out),
        "--base-model", str(world["base"]), "--text-encoder", "sd15", "--latent-encoder", "vae",
        "--scorers", "clip,c2_brightness", "--scorer-config", str(world["config"]),
        "--plugins", "plugin_c2", "--resolution", "16", "--records-per-shard", "4",
        "--batch-size", "3", "--device", "cpu", *extra,
    ]  # fmt: skip


def _records(out):
    from array_record.python.array_record_module import ArrayRecordReader

    records = []
    for shard in sorted(Path(out).glob("shard-*" + schema.SHARD_SUFFIX)):
        reader = ArrayRecordReader(str(shard))
        records += [schema.decode_record(r) for r in reader.read_all()]
        reader.close()
    return records


@pytest.fixture(scope="module")
def keep_run(world):
    out = world["root"] / "keep"
    manifest = preprocess.main(
        _argv(world, out, "--tie-policy", "keep", "--flip-views", "--human-ties", "keep")
    )
    return out, manifest


def test_manifest_counts_and_fields(world, keep_run):
    out, manifest = keep_run
    assert manifest == json.loads((out / schema.MANIFEST_NAME).read_text())
    counts = manifest["counts"]
    assert counts["read"] == NUM_PAIRS and counts["skipped"] == {"undecodable_image": 1}
    assert counts["scored"] == counts["written"] == NUM_PAIRS - 1
    assert [s["name"] for s in manifest["shards"]] == [schema.shard_name(0, s) for s in range(3)]
    assert [s["num_records"] for s in manifest["shards"]] == [3, 4, 4]  # pair 3 is in shard 0
    assert manifest["scorer_names"] == ["clip", "c2_brightness"]
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["text_shape"] == [77, 32]
    assert manifest["views"] == 2 and manifest["pooled_dim"] is None
    assert manifest["vae_scaling_factor"] == pytest.approx(0.18215)
    assert manifest["package_versions"]["torch"] == torch.__version__.split("+")[0]
    assert manifest["scorers"]["clip"]["backend"] == "transformers"
    empty = np.load(out / schema.EMPTY_PROMPT_NAME)
    assert empty["text_embeds"].shape == (77, 32) and "pooled_text_embeds" not in empty


def test_votes_labels_stats_and_agreement_by_hand(world, keep_run):
    out, manifest = keep_run
    records = _records(out)
    by_id = {r["pair_id"]: r for r in records}
    assert sorted(by_id) == sorted(str(1000 + i) for i in range(NUM_PAIRS) if i != CORRUPT)
    scores = np.stack([r["scores"] for r in records])  # [N, K, 2]
    hand_votes = np.where(scores[..., 0] >= scores[..., 1], 1, -1)
    np.testing.assert_array_equal(np.stack([r["votes"] for r in records]), hand_votes)
    margin = hand_votes.sum(1)
    np.testing.assert_array_equal([r["margin"] for r in records], margin)
    np.testing.assert_array_equal([r["label"] for r in records], np.sign(margin))
    assert manifest["counts"]["ties"] == int((margin == 0).sum())
    tie = by_id[str(1000 + TIE)]
    assert (tie["scores"][:, 0] == tie["scores"][:, 1]).all() and (tie["votes"] == 1).all()
    human = {"1000": 1.0, "1001": -1.0, "1002": 0.0}
    for r in records:
        i = int(r["pair_id"]) - 1000
        assert float(r["human_label"]) == human[str(1000 + i % 3)]
    stats = manifest["score_stats"]
    np.testing.assert_allclose(stats["c2_brightness"]["mean"], scores[:, 1].mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["clip"]["std"], scores[:, 0].std(), rtol=1e-4)
    human_N = np.array([float(r["human_label"]) for r in records])
    decided = human_N != 0
    expected = (hand_votes[decided] == human_N[decided, None]).mean(0)
    table = manifest["agreement"]["with_human"]
    assert table["pairs"] == int(decided.sum())
    np.testing.assert_allclose([table["per_scorer"]["clip"], table["per_scorer"]["c2_brightness"]],
                               expected)  # fmt: skip


def test_latents_and_text_match_diffusers(world, keep_run):
    from torchvision import transforms

    out, _ = keep_run
    record = next(r for r in _records(out) if r["pair_id"] == "1006")
    row = world["rows"][6]
    to_pixels = transforms.Compose([
        transforms.Resize(16, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(16), transforms.ToTensor(), transforms.Normalize([0.5], [0.5]),
    ])  # fmt: skip
    for key, jpg in (("moments_0", row["jpg_0"]), ("moments_1", row["jpg_1"])):
        pixels = to_pixels(PIL.Image.open(io.BytesIO(jpg)).convert("RGB"))[None]
        with torch.no_grad():
            dist = world["vae"].encode(torch.cat([pixels, pixels.flip(-1)])).latent_dist
        assert record[key].shape == (2, 2, 4, 8, 8) and record[key].dtype == np.float16
        np.testing.assert_allclose(record[key][:, 0], dist.mean.numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(record[key][:, 1], dist.logvar.numpy(), atol=2e-2, rtol=2e-3)
    ids = build_clip_tokenizer(world["root"] / "src2")(
        [row["caption"]], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = world["text_encoder"](ids)[0][0].numpy()
    np.testing.assert_allclose(record["text_embeds"], hidden, atol=2e-3, rtol=2e-3)


def test_rerun_skips_finished_shards(world, keep_run):
    out, manifest = keep_run
    shards = sorted(out.glob("shard-*"))
    mtimes = [s.stat().st_mtime_ns for s in shards]
    again = preprocess.main(
        _argv(world, out, "--tie-policy", "keep", "--flip-views", "--human-ties", "keep")
    )
    assert [s.stat().st_mtime_ns for s in shards] == mtimes
    assert again["counts"] == manifest["counts"] and again["shards"] == manifest["shards"]
    with pytest.raises(preprocess.OutputFolderError, match="other settings"):
        preprocess.run(
            preprocess.parse_args(
                _argv(world, out, "--tie-policy", "drop", "--flip-views", "--human-ties", "keep")
            )
        )


def test_drop_policy_and_reader_compatibility(world, keep_run):
    from bdpo_jax import data

    out = world["root"] / "drop"
    manifest = preprocess.main(_argv(world, out, "--tie-policy", "drop", "--human-ties", "keep"))
    counts, keep_counts = manifest["counts"], keep_run[1]["counts"]
    assert counts["ties"] == keep_counts["ties"] == counts["dropped_ties"]
    assert counts["written"] == counts["scored"] - counts["ties"]
    assert all(int(r["label"]) != 0 for r in _records(out))
    info = data.read_dataset_info(str(out))
    assert info.num_records == counts["written"] and info.views == 1


def test_pickapic_human_ties_dropped_by_default(world):
    """The authors' recipe: Pick-a-Pic pairs with label_0 = 0.5 never reach the scorers."""
    out = world["root"] / "human_ties"
    manifest = preprocess.main(_argv(world, out))
    counts = manifest["counts"]
    human_ties = [i for i in range(NUM_PAIRS) if i % 3 == 2]  # labels[2] is (0.5, 0.5)
    assert CORRUPT not in human_ties and TIE in human_ties
    assert counts["read"] == NUM_PAIRS and counts["dropped_human_ties"] == len(human_ties)
    assert counts["skipped"] == {"undecodable_image": 1}
    assert counts["scored"] == NUM_PAIRS - len(human_ties) - 1
    assert counts["written"] == counts["scored"] - counts["dropped_ties"]
    records = _records(out)
    assert all(float(r["human_label"]) != 0 for r in records)
    assert not {int(r["pair_id"]) - 1000 for r in records} & set(human_ties)
    assert manifest["human_ties"] == "drop"


def test_injected_failure_leaves_no_partial_shard(world, keep_run, monkeypatch):
    out = world["root"] / "fail"
    real_write, written = shard_writer.ShardWriter.write, []

    def failing_write(self, record):
        if len(written) == 6:  # shard 0 holds 3 records: this is the 4th record of shard 1
            raise RuntimeError("injected failure")
        written.append(record["pair_id"])
        real_write(self, record)

    monkeypatch.setattr(shard_writer.ShardWriter, "write", failing_write)
    argv = _argv(
        world, out, "--tie-policy", "keep", "--human-ties", "keep", "--latent-encoder", "identity"
    )
    argv[argv.index("--scorers") + 1] = "c2_brightness"  # cheap settings: no VAE, no CLIP
    with pytest.raises(RuntimeError, match="injected"):
        preprocess.main(argv)
    assert sorted(p.name for p in out.iterdir()) == [schema.shard_name(0, 0),
                                                     schema.shard_name(0, 0) + ".json"]  # fmt: skip
    monkeypatch.undo()
    manifest = preprocess.main(argv)
    assert manifest["counts"]["written"] == 11 and manifest["counts"]["read"] == NUM_PAIRS
    for a, b in zip(_records(out), _records(keep_run[0]), strict=True):
        assert a["pair_id"] == b["pair_id"]
        np.testing.assert_array_equal(a["scores"][0], b["scores"][1])  # brightness


def test_killed_subprocess_then_resume(world, keep_run):
    out = world["root"] / "killed"
    env = {**os.environ, "C2_KILL_AT_CALL": "3",
           "PYTHONPATH": os.pathsep.join([str(world["root"]), str(ROOT)])}  # fmt: skip
    argv = _argv(
        world, out, "--tie-policy", "keep", "--human-ties", "keep", "--latent-encoder", "identity"
    )
    argv[argv.index("--scorers") + 1] = "c2_brightness"  # fewer imports in the subprocess
    proc = subprocess.run([sys.executable, "-m", "scorers_torch.preprocess", *argv], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    # batches of 3: call 1 = pairs 0-2, pair 3 is corrupt (no call), calls 2 and 3 = shard 1
    assert schema.shard_name(0, 0) in names and schema.shard_name(0, 1) not in names
    assert any(n.startswith(shard_writer.TEMP_PREFIX) for n in names)  # the killed temp file
    manifest = preprocess.main(argv)
    assert not any(p.name.startswith(shard_writer.TEMP_PREFIX) for p in out.iterdir())
    assert manifest["counts"]["read"] == NUM_PAIRS and manifest["counts"]["written"] == 11
    assert [r["pair_id"] for r in _records(out)] == [r["pair_id"] for r in _records(keep_run[0])]


def test_two_workers_split_disjointly(world):
    from bdpo_jax import data

    out = world["root"] / "workers"
    ids = []
    for worker in (0, 1):
        argv = _argv(
            world,
            out,
            "--latent-encoder",
            "identity",
            "--tie-policy",
            "keep",
            "--human-ties",
            "keep",
            "--num-workers",
            "2",
            "--worker-index",
            str(worker),
            "--limit",
            "10",
        )
        manifest = preprocess.main(argv)
        assert (out / schema.manifest_name(worker, 2)).is_file()
        assert manifest["latent_shape"] == [3, 16, 16] and manifest["vae_scaling_factor"] == 1.0
        ids.append({r for r in (x["pair_id"] for x in _records(out)) if int(r) % 2 == worker})
    assert ids[0] == {"1000", "1002", "1004", "1006", "1008"}
    assert ids[1] == {"1001", "1005", "1007", "1009"}  # 1003 is corrupt
    assert data.read_manifest(str(out))["counts"]["read"] == 10

    # the trainer's reader sees the same records as from one worker (the same set; the global
    # order is worker-major: worker 0's pairs, then worker 1's; one folder's order is fixed,
    # so every process count and resume trains alike on it)
    single = world["root"] / "one_worker"
    keep = ("--tie-policy", "keep", "--human-ties", "keep", "--limit", "10")
    preprocess.main(_argv(world, single, "--latent-encoder", "identity", *keep))
    split_info, single_info = data.read_dataset_info(str(out)), data.read_dataset_info(str(single))
    assert split_info.num_records == single_info.num_records == 9
    np.testing.assert_allclose(split_info.score_mean, single_info.score_mean, rtol=1e-6)
    split = data.read_records(str(out), range(9))
    by_id = {r["pair_id"]: r for r in data.read_records(str(single), range(9))}
    assert [r["pair_id"] for r in split] == sorted(ids[0]) + sorted(ids[1])
    assert sorted(by_id) == sorted(r["pair_id"] for r in split)
    for record in split:
        for key, value in record.items():
            want = by_id[record["pair_id"]][key]
            if key == "scores":  # a torch scorer's batched kernels round the last bit by batch
                np.testing.assert_allclose(value, want, rtol=2e-5, atol=1e-7, err_msg=key)
            else:
                np.testing.assert_array_equal(value, want, err_msg=key)


def test_generic_jsonl_with_relative_paths(world, tmp_path, caplog):
    for i in range(3):
        (tmp_path / f"img{i}.jpg").write_bytes(_jpeg(50 + i))
    lines = [{"prompt": "p0", "image_0": "img0.jpg", "image_1": "img1.jpg", "human_label": -1},
             {"prompt": "p1", "image_0": "img2.jpg", "image_1": "missing.jpg"}]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    argv = _argv(world, tmp_path / "out", "--latent-encoder", "identity")
    argv[argv.index("--input") + 1] = str(tmp_path / "pairs.jsonl")
    argv[argv.index("--format") + 1] = "generic"
    with caplog.at_level(logging.WARNING):
        manifest = preprocess.main(argv + ["--tie-policy", "keep"])
    assert manifest["counts"]["skipped"] == {"unreadable_file_image": 1}
    assert "pair pairs.jsonl:1: image_1 is unreadable file" in caplog.text
    (record,) = _records(tmp_path / "out")
    assert record["pair_id"] == "pairs.jsonl:0" and float(record["human_label"]) == -1.0


def test_bad_inputs_have_clear_errors(world, tmp_path):
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b""]}), tmp_path / "bad.parquet")
    with pytest.raises(inputs.InputError, match=r"bad.parquet.*\['jpg_1', 'label_0', 'label_1'\]"):
        list(inputs.read_pairs([str(tmp_path / "bad.parquet")], "pickapic"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        inputs.expand_inputs([str(tmp_path / "none-*.parquet")])
    with pytest.raises(SystemExit):
        preprocess.parse_args(_argv(world, tmp_path, "--num-workers", "2", "--worker-index", "2"))


if "pp_constant" not in SCORERS:  # a scorer that needs no model, for the CLI error tests
    SCORERS.register("pp_constant")(lambda: None)

CLI_ERRORS = {  # problem -> (JSONL lines or None for no file, extra flags, culprit in the error)
    "missing input file": (None, [], "pairs.jsonl' does not exist"),
    "invalid JSONL line": (['{"prompt": "a", "image_0": "x.png", "image_1": "y.png"}', "{oops"],
                           [], "pairs.jsonl:2: invalid JSON"),
    "record without image_1": (['{"prompt": "a", "image_0": "x.png"}'], [],
                               "pairs.jsonl:1: missing field(s) ['image_1']"),
    "unknown scorer": ([], ["--scorers", "pp_constant,no_such_scorer"],
                       "--scorers, scorer 'no_such_scorer': unknown scorer"),
    "unknown text encoder": ([], ["--text-encoder", "sd9"],
                             "--text-encoder: unknown text encoder 'sd9'"),
    "unknown plugin": ([], ["--plugins", "no_such_plugin_module_xyz"], "--plugins"),
    "bad flag value": ([], ["--resolution", "0"], "--resolution must be > 0"),
    "bad flag type": ([], ["--batch-size", "many"], "--batch-size"),
}  # fmt: skip


def _cli_argv(tmp_path, problem: str) -> list[str]:
    lines, extra, _ = CLI_ERRORS[problem]
    if lines is not None:
        (tmp_path / "pairs.jsonl").write_text("".join(line + "\n" for line in lines))
    return [
        "--input", str(tmp_path / "pairs.jsonl"), "--format", "generic",
        "--out", str(tmp_path / "out"), "--base-model", "unused", "--scorers", "pp_constant",
        "--latent-encoder", "identity", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("problem", list(CLI_ERRORS))
def test_cli_user_errors_are_one_line(tmp_path, capsys, problem):
    argv = _cli_argv(tmp_path, problem)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines, err
    if not problem.startswith("bad flag"):  # argparse prints its usage before the error line
        assert len(lines) == 1, err
    assert (
        lines[-1].startswith(f"{preprocess.PROG}: error: ") and CLI_ERRORS[problem][2] in lines[-1]
    )


def test_cli_user_error_in_a_subprocess_and_debug_traceback(tmp_path):
    argv = _cli_argv(tmp_path, "missing input file")
    command = [sys.executable, "-m", "scorers_torch.preprocess", *argv]
    env = {k: v for k, v in os.environ.items() if k != schema.DEBUG_ENV}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"{preprocess.PROG}: error: --input file {str(tmp_path / 'pairs.jsonl')!r} does not exist"
    ]
    debug = subprocess.run(command + ["--debug"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "InputNotFoundError" in debug.stderr


def test_an_undecodable_image_skips_its_pair_only(caplog):
    good_jpeg = _jpeg(7)
    batch = [
        inputs.Pair(0, "bad", "p", b"not an image", good_jpeg, float("nan")),
        inputs.Pair(1, "good", "p", good_jpeg, good_jpeg, 1.0),
    ]
    counts: dict = {"skipped": {}}
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(1) as pool:
        good = inputs.decode_pairs(batch, counts, pool)
    assert [pair.pair_id for pair, *_ in good] == ["good"]
    assert counts["skipped"] == {"undecodable_image": 1} and "skipping pair bad" in caplog.text


def test_sdxl_records_carry_pooled_and_time_ids(world, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    base = tmp_path / "sdxl"
    shutil.copytree(world["base"] / "tokenizer", base / "tokenizer")
    shutil.copytree(world["base"] / "text_encoder", base / "text_encoder")
    CLIPTokenizer.from_pretrained(base / "tokenizer", pad_token="!").save_pretrained(
        base / "tokenizer_2"
    )
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=8,
    )  # fmt: skip
    CLIPTextModelWithProjection(config).save_pretrained(base / "text_encoder_2")
    argv = _argv(world, tmp_path / "out", "--latent-encoder", "identity", "--limit", "3")
    argv[argv.index("--base-model") + 1] = str(base)
    argv[argv.index("--text-encoder") + 1] = "sdxl"
    argv[argv.index("--scorers") + 1] = "c2_brightness"
    manifest = preprocess.main(argv)
    assert manifest["text_shape"] == [77, 32 + 16] and manifest["pooled_dim"] == 8
    records = _records(tmp_path / "out")
    assert len(records) == manifest["counts"]["written"] > 0
    for record in records:
        assert record["pooled_text_embeds"].shape == (8,)
        np.testing.assert_array_equal(record["add_time_ids"], [16, 16, 0, 0, 16, 16])
    empty = np.load(tmp_path / "out" / schema.EMPTY_PROMPT_NAME)
    assert empty["pooled_text_embeds"].shape == (8,)
