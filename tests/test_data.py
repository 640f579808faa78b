"""The shard folder reader and the Grain pipeline, over ArrayRecord shards written here."""

import json
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from bdpo_jax import data, schema
from configs.default import get_config

NUM_RECORDS = 30
SHARD_SIZES = ((0, 0, 10), (0, 1, 11), (1, 0, 9))  # (worker, shard, records)
K, C, H, W, L, D = 4, 2, 3, 3, 5, 6


def _record(index: int) -> dict:
    """Record `index`: moments[v, 0] = index, moments[v, 1] = 10 * image + v (to read back)."""
    rng = np.random.default_rng(index)
    if index % 5 == 0:  # a 2-2 tie of the four votes
        votes = np.array([1, -1, 1, -1])
    else:
        votes = rng.choice([-1, 1], size=K)
        if votes.sum() == 0:  # no accidental ties elsewhere (K = 4: the sum is even)
            votes[0] = -votes[0]
    score_1 = rng.normal(size=K)
    scores = np.stack([score_1 + 0.5 * votes, score_1], axis=1)
    human = [np.nan, 0.0][index % 7] if index % 7 < 2 else [1.0, -1.0][index % 2]

    def moments(image):
        m = np.zeros((2, 2, C, H, W), np.float32)
        for v in range(2):
            m[v, 0], m[v, 1] = index, 10 * image + v
        return m

    return {
        "pair_id": f"p{index}",
        "prompt": f"prompt number {index}",
        "moments_0": moments(0),
        "moments_1": moments(1),
        "text_embeds": np.full((L, D), index),
        "scores": scores,
        "votes": votes,
        "label": int(np.sign(votes.sum())),
        "margin": int(votes.sum()),
        "human_label": human,
    }


def _manifest(shards, scores, version=schema.SCHEMA_VERSION):
    return {
        "schema_version": version,
        "scorer_names": [f"s{k}" for k in range(K)],
        "latent_shape": [C, H, W],
        "text_shape": [L, D],
        "pooled_dim": None,
        "views": 2,
        "vae_scaling_factor": 0.18215,
        "score_stats": {
            f"s{k}": {"mean": float(scores[:, k].mean()), "std": float(scores[:, k].std())}
            for k in range(K)
        },
        "shards": shards,
        "counts": {"written": sum(s["num_records"] for s in shards), "skipped": {"corrupt": 1}},
    }


def _write_shard(path, records, options="group_size:1,uncompressed"):
    writer = ArrayRecordWriter(path, options)
    for record in records:
        writer.write(record if isinstance(record, bytes) else schema.encode_record(record))
    writer.close()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Two workers' manifests over three shards of 30 records in all."""
    folder = tmp_path_factory.mktemp("shards")
    index = 0
    per_worker = {0: ([], []), 1: ([], [])}
    for worker, shard, size in SHARD_SIZES:
        records = [_record(i) for i in range(index, index + size)]
        index += size
        name = schema.shard_name(worker, shard)
        _write_shard(str(folder / name), records)
        per_worker[worker][0].append({"name": name, "num_records": size})
        per_worker[worker][1].extend(r["scores"].T for r in records)
    for worker, (shards, scores) in per_worker.items():
        manifest = _manifest(shards, np.concatenate(scores))
        (folder / schema.manifest_name(worker, 2)).write_text(json.dumps(manifest))
    np.savez(folder / schema.EMPTY_PROMPT_NAME, text_embeds=np.ones((L, D), np.float16))
    return str(folder)


def _config(path="", **overrides):
    config = get_config().data
    config.path = path
    config.prefetch = 0
    config.drop_tied_labels = False
    config.update(overrides)
    return config


def _batches(config, n, batch=5, seed=0, mode="majority", **kwargs):
    dataset, _ = data.make_dataset(
        config, global_batch_size=batch, seed=seed, label_mode=mode, **kwargs
    )
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]


def test_dataset_info_merges_manifests(shard_dir):
    info = data.read_dataset_info(shard_dir)
    assert info.num_records == NUM_RECORDS and info.views == 2
    assert info.scorer_names == ("s0", "s1", "s2", "s3")
    assert info.latent_shape == (C, H, W) and info.text_shape == (L, D)
    assert info.pooled_dim is None and info.empty_pooled_text_embeds is None
    np.testing.assert_array_equal(info.empty_text_embeds, np.ones((L, D), np.float16))
    scores_NxK = np.concatenate([_record(i)["scores"].T for i in range(NUM_RECORDS)])
    np.testing.assert_allclose(info.score_mean, scores_NxK.mean(0), rtol=1e-5)
    np.testing.assert_allclose(info.score_std, scores_NxK.std(0), rtol=1e-5)
    manifest = data.read_manifest(shard_dir)
    assert manifest["counts"] == {"written": 30, "skipped": {"corrupt": 2}}


def test_batch_keys_dtypes_and_values(shard_dir):
    (batch,) = _batches(_config(shard_dir, random_flip=False), 1)
    expected = {
        "moments_0": (np.float16, (5, 2, C, H, W)),
        "moments_1": (np.float16, (5, 2, C, H, W)),
        "text_embeds": (np.float16, (5, L, D)),
        "scores": (np.float32, (5, K, 2)),
        "votes": (np.int8, (5, K)),
        "label": (np.int8, (5,)),
        "margin": (np.int8, (5,)),
        "human_label": (np.float32, (5,)),
        "index": (np.int64, (5,)),
    }
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        k: (np.dtype(d), s) for k, (d, s) in expected.items()
    }
    for j, index in enumerate(batch["index"]):
        record = _record(int(index))
        np.testing.assert_array_equal(batch["moments_0"][j], record["moments_0"][0])
        np.testing.assert_array_equal(batch["moments_1"][j], record["moments_1"][0])
        np.testing.assert_array_equal(batch["scores"][j], record["scores"].astype(np.float32))
        np.testing.assert_array_equal(batch["votes"][j], record["votes"])
        assert batch["label"][j] == record["label"] and batch["margin"][j] == record["margin"]


def test_each_record_once_per_epoch_and_seeded_order(shard_dir):
    batches = _batches(_config(shard_dir), 12)
    epoch_0 = np.concatenate([b["index"] for b in batches[:6]])
    epoch_1 = np.concatenate([b["index"] for b in batches[6:]])
    assert sorted(epoch_0) == list(range(NUM_RECORDS))
    assert sorted(epoch_1) == list(range(NUM_RECORDS))
    assert not np.array_equal(epoch_0, epoch_1)  # reshuffled every epoch
    again = np.concatenate([b["index"] for b in _batches(_config(shard_dir), 6)])
    np.testing.assert_array_equal(epoch_0, again)
    other = np.concatenate([b["index"] for b in _batches(_config(shard_dir), 6, seed=1)])
    assert not np.array_equal(epoch_0, other)
    unshuffled = _batches(_config(shard_dir, shuffle=False), 6)
    assert list(np.concatenate([b["index"] for b in unshuffled])) == list(range(NUM_RECORDS))


def test_two_processes_read_disjoint_halves(shard_dir):
    config = _config(shard_dir)
    host_indices = [
        np.concatenate(
            [b["index"] for b in _batches(config, 3, batch=10, process_index=p, process_count=2)]
        )
        for p in range(2)
    ]
    assert all(len(ix) == 15 for ix in host_indices)
    assert not set(host_indices[0]) & set(host_indices[1])
    assert sorted(np.concatenate(host_indices)) == list(range(NUM_RECORDS))


@pytest.mark.parametrize("mode", ["majority", "human", "single"])
def test_tie_filter(shard_dir, mode):
    """A tie is replaced by a random non-tied record; every other position is unchanged."""
    records = [_record(i) for i in range(NUM_RECORDS)]
    kept = {i for i, r in enumerate(records) if data.keep_record(r, mode)}
    if mode == "majority":
        assert kept == {i for i, r in enumerate(records) if r["label"] != 0}
    elif mode == "human":
        assert kept == {i for i, r in enumerate(records) if r["human_label"] in (1.0, -1.0)}
    else:
        assert kept == set(range(NUM_RECORDS))
    assert 0 < len(kept) <= NUM_RECORDS
    filtered = _batches(_config(shard_dir, drop_tied_labels=True), 6, mode=mode)
    plain = _batches(_config(shard_dir), 6, mode=mode)
    seen = np.concatenate([b["index"] for b in filtered])
    order = np.concatenate([b["index"] for b in plain])
    assert set(seen) <= kept
    same = [i in kept for i in order]
    np.testing.assert_array_equal(seen[same], order[same])
    assert (mode == "single") == all(same)
    for position in np.flatnonzero(~np.array(same)):  # the replacement drawn for that position
        attempt, index = 1, data.replacement_index(0, int(position), 1, NUM_RECORDS)
        while index not in kept:
            attempt += 1
            index = data.replacement_index(0, int(position), attempt, NUM_RECORDS)
        assert seen[position] == index


def test_view_choice_per_image(shard_dir):
    seed, batch_size = 3, 5
    batches = _batches(_config(shard_dir), 6, batch=batch_size, seed=seed)
    views = []
    for b, batch in enumerate(batches):
        for j in range(batch_size):
            v0, v1 = data.choose_views(seed, b * batch_size + j, 2)
            index = batch["index"][j]
            assert batch["moments_0"][j, 0].min() == batch["moments_0"][j, 0].max() == index
            assert batch["moments_0"][j, 1, 0, 0, 0] == v0
            assert batch["moments_1"][j, 1, 0, 0, 0] == 10 + v1
            views.append((v0, v1))
    assert len(set(views)) == 4  # both views of both images, chosen independently
    unflipped = _batches(_config(shard_dir, random_flip=False), 6, batch=batch_size, seed=seed)
    assert all((b["moments_0"][:, 1] == 0).all() for b in unflipped)
    assert all((b["moments_1"][:, 1] == 10).all() for b in unflipped)


def _iterator(config, seed=0):
    dataset, _ = data.make_dataset(config, global_batch_size=4, seed=seed, label_mode="majority")
    return iter(dataset)


def _assert_same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterator_state_resumes_exactly(shard_dir, prefetch):
    config = _config(shard_dir, drop_tied_labels=True, prefetch=prefetch)
    iterator = _iterator(config)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(6)]
    fresh = _iterator(config)
    fresh.set_state(state)
    _assert_same_batches(expected, [next(fresh) for _ in range(6)])


def test_a_pipeline_started_at_a_position_continues_the_stream(shard_dir):
    """The trainer's data position: starting at 4 x B equals skipping 4 batches."""
    for prefetch in (0, 2):
        config = _config(shard_dir, drop_tied_labels=True, prefetch=prefetch)
        stream = _batches(config, 9, batch=4)
        _assert_same_batches(stream[4:], _batches(config, 5, batch=4, start=16))


@pytest.mark.parametrize("processes", [2, 4])
def test_hosts_together_load_the_one_process_batch(shard_dir, processes):
    """The global batch of a step does not depend on the number of processes: host p loads
    its slice of it (ties replaced and views chosen by global position), and any set of rows
    gets those rows."""
    config = _config(shard_dir, drop_tied_labels=True)
    one = _batches(config, 5, batch=8, seed=3)
    hosts = [
        _batches(config, 5, batch=8, seed=3, process_index=p, process_count=processes)
        for p in range(processes)
    ]
    for t, batch in enumerate(one):
        for key in batch:
            joined = np.concatenate([host[t][key] for host in hosts])
            np.testing.assert_array_equal(joined, batch[key], err_msg=key)
    rows = _batches(config, 5, batch=8, seed=3, rows=[1, 6])
    for t, batch in enumerate(one):
        for key in batch:
            np.testing.assert_array_equal(rows[t][key], batch[key][[1, 6]], err_msg=key)
    with pytest.raises(ValueError, match="ascending"):
        _batches(config, 1, batch=8, rows=[3, 1])
    with pytest.raises(ValueError, match="outside the global batch"):
        _batches(config, 1, batch=8, rows=[8])


def test_worker_processes_give_the_same_batches_and_resume(shard_dir):
    config = _config(shard_dir, num_workers=2, prefetch=1)
    iterator = _iterator(config)
    # a Grain worker makes whole batches (worker w: batches w, w + 2, ...): same stream
    batches = [next(iterator) for _ in range(6)]
    _assert_same_batches(batches, _batches(_config(shard_dir), 6, batch=4))
    epoch = np.concatenate([b["index"] for b in batches])
    assert len(set(epoch)) == 24 and set(epoch) <= set(range(NUM_RECORDS))
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    iterator.close()
    fresh = _iterator(config)
    fresh.set_state(state)
    _assert_same_batches(expected, [next(fresh) for _ in range(3)])
    fresh.close()


def test_read_records_by_global_index(shard_dir):
    records = data.read_records(shard_dir, [0, 10, 29])
    assert [r["prompt"] for r in records] == [
        "prompt number 0",
        "prompt number 10",
        "prompt number 29",
    ]
    np.testing.assert_array_equal(
        records[1]["moments_1"], _record(10)["moments_1"].astype(np.float16)
    )
    with pytest.raises(IndexError, match="out of range"):
        data.read_records(shard_dir, [30])


def test_clear_errors(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_dataset_info(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="data path is empty"):
        data.read_dataset_info("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        data.read_dataset_info(str(empty))
    (empty / schema.MANIFEST_NAME).write_text(json.dumps(_manifest([], np.zeros((1, K)))))
    with pytest.raises(schema.SchemaError, match="empty shard set"):
        data.read_dataset_info(str(empty))
    old = tmp_path / "old"
    old.mkdir()
    manifest = _manifest([{"name": "x", "num_records": 1}], np.zeros((1, K)), version=0)
    (old / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(schema.SchemaError, match="manifest.json: schema_version 0"):
        data.read_dataset_info(str(old))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for worker, shape in enumerate(([C, H, W], [C, 2 * H, 2 * W])):
        manifest = _manifest([{"name": "x", "num_records": 1}], np.zeros((1, K)))
        manifest["latent_shape"] = shape
        (mixed / schema.manifest_name(worker, 2)).write_text(json.dumps(manifest))
    with pytest.raises(schema.SchemaError, match="manifest-w001.json: latent_shape"):
        data.read_dataset_info(str(mixed))
    with pytest.raises(ValueError, match="unknown config.data.source"):
        data.make_dataset(
            _config(shard_dir, source="tfds"), global_batch_size=4, seed=0, label_mode="majority"
        )
    with pytest.raises(ValueError, match="not divisible"):
        data.make_dataset(
            _config(shard_dir), global_batch_size=5, seed=0, label_mode="majority", process_count=2
        )


def _reader_error_folder(tmp_path, problem: str) -> tuple[str, str]:
    """(config.data.path with `problem`, the culprit its error must name)."""
    if problem == "empty path":
        return "", "config.data.path"
    if problem == "missing folder":
        return str(tmp_path / "nope"), "nope"
    folder = tmp_path / "shards"
    folder.mkdir()
    if problem == "no manifest":
        return str(folder), str(folder)
    if problem == "bad JSON":
        (folder / schema.MANIFEST_NAME).write_text('{"schema_version": 1,')
        return str(folder), os.path.join(str(folder), schema.MANIFEST_NAME)
    _one_shard_folder(folder, [_record(1)])
    os.remove(folder / "shard.array_record")
    return str(folder), "shard.array_record"


@pytest.mark.parametrize(
    "problem", ["empty path", "missing folder", "no manifest", "bad JSON", "missing shard"]
)
def test_reader_errors_are_one_line_user_errors(tmp_path, capsys, problem):
    path, culprit = _reader_error_folder(tmp_path, problem)
    with pytest.raises(schema.UserError) as error:
        data.read_dataset_info(path)
    assert "config.data.path" in str(error.value) and culprit in str(error.value)
    with pytest.raises(SystemExit) as exit_info:
        schema.run_cli("bdpo_jax.train", lambda: data.read_dataset_info(path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and culprit in err and "Traceback" not in err


def _one_shard_folder(folder, records, num_records=None, options="group_size:1"):
    _write_shard(str(folder / "shard.array_record"), records, options)
    count = len(records) if num_records is None else num_records
    manifest = _manifest([{"name": "shard.array_record", "num_records": count}], np.zeros((1, K)))
    (folder / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    np.savez(folder / schema.EMPTY_PROMPT_NAME, text_embeds=np.zeros((L, D)))
    return str(folder)


def test_chunked_shards_get_a_performance_warning(shard_dir, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        _iterator(_config(shard_dir))
    assert "group_size" not in caplog.text
    folder = _one_shard_folder(tmp_path, [_record(1), _record(2)], options="group_size:2")
    with caplog.at_level("WARNING"):
        _iterator(_config(folder))
    assert "group_size:2" in caplog.text


def test_record_with_another_version_fails_on_read(tmp_path):
    encoded = schema.encode_record(_record(1))
    patched = encoded.replace(b'"schema_version":1', b'"schema_version":7')
    assert patched != encoded
    iterator = _iterator(_config(_one_shard_folder(tmp_path, [patched])))
    with pytest.raises(schema.SchemaError, match="schema_version 7"):
        next(iterator)


def test_stale_manifest_and_all_ties_fail_clearly(tmp_path):
    (tmp_path / "a").mkdir()
    stale = _one_shard_folder(tmp_path / "a", [_record(1), _record(2)], num_records=3)
    with pytest.raises(schema.SchemaError, match="hold 2 records but the manifest says 3"):
        _iterator(_config(stale))
    os.remove(os.path.join(stale, "shard.array_record"))
    with pytest.raises(FileNotFoundError, match="missing"):
        data.read_dataset_info(stale)
    (tmp_path / "b").mkdir()
    ties = _one_shard_folder(tmp_path / "b", [_record(0), _record(5), _record(10)])
    iterator = _iterator(_config(ties, drop_tied_labels=True))
    with pytest.raises(ValueError, match="in a row are ties for label mode 'majority'"):
        next(iterator)
