"""The record codec round-trips every field and rejects malformed records clearly."""

import struct

import numpy as np
import pytest

from bdpo_jax import schema


def _record(**overrides):
    rng = np.random.default_rng(0)
    record = {
        "pair_id": "pair-1",
        "prompt": "a red circle, top left",
        "moments_0": rng.normal(size=(2, 2, 4, 8, 8)),
        "moments_1": rng.normal(size=(2, 2, 4, 8, 8)),
        "text_embeds": rng.normal(size=(7, 16)),
        "pooled_text_embeds": rng.normal(size=(12,)),
        "add_time_ids": np.array([64, 64, 0, 0, 64, 64]),
        "scores": rng.normal(size=(3, 2)),
        "votes": np.array([1, -1, 1]),
        "label": 1,
        "margin": 1,
        "human_label": np.nan,
    }
    record.update(overrides)
    return record


def test_round_trip_keeps_values_dtypes_and_shapes():
    record = _record()
    decoded = schema.decode_record(schema.encode_record(record))
    assert decoded["pair_id"] == "pair-1" and decoded["prompt"] == record["prompt"]
    for name, (dtype, ndim, _) in schema.ARRAY_FIELDS.items():
        value = decoded[name]
        assert value.dtype == np.dtype(dtype), name
        assert value.ndim == ndim, name
        np.testing.assert_array_equal(value, np.asarray(record[name], dtype=dtype), err_msg=name)


def test_optional_fields_may_be_absent():
    record = _record()
    del record["pooled_text_embeds"], record["add_time_ids"]
    decoded = schema.decode_record(schema.encode_record(record))
    assert "pooled_text_embeds" not in decoded and "add_time_ids" not in decoded


def test_arrays_are_aligned_views():
    data = schema.encode_record(_record())
    (header_len,) = struct.unpack_from("<I", data, 0)
    assert (4 + header_len) % 16 == 0
    decoded = schema.decode_record(data)
    assert not decoded["moments_0"].flags.writeable  # a view into the bytes, no copy


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moments_0": np.zeros((4, 8, 8))}, "'moments_0' must have 5 dimensions"),
        ({"votes": np.array([1, 1])}, "disagree on K"),
        ({"prompt": None}, "'prompt' must be a str"),
        ({"extra": 1}, "unknown fields"),
    ],
)
def test_malformed_records_are_named(overrides, message):
    with pytest.raises(schema.SchemaError, match=message):
        schema.encode_record(_record(**overrides))


def test_missing_required_field_is_named():
    record = _record()
    del record["scores"]
    with pytest.raises(schema.SchemaError, match="missing required field 'scores'"):
        schema.encode_record(record)


def test_version_mismatch_is_rejected():
    data = bytearray(schema.encode_record(_record()))
    text = data.decode("latin-1").replace('"schema_version":1', '"schema_version":9', 1)
    with pytest.raises(schema.SchemaError, match="schema_version 9"):
        schema.decode_record(text.encode("latin-1"))
    with pytest.raises(schema.SchemaError, match="manifest.json: schema_version 0"):
        schema.check_manifest_version({"schema_version": 0}, "manifest.json")


def test_batch_field_names_follow_the_record_schema():
    assert schema.BATCH_FIELDS == tuple(schema.ARRAY_FIELDS)  # every numeric field, in order
    assert schema.MODEL_INPUT_FIELDS == schema.BATCH_FIELDS[:5]
    assert set(schema.MODEL_INPUT_FIELDS) >= {"moments_0", "moments_1", "text_embeds"}


def test_run_cli_turns_user_errors_into_one_line(capsys, monkeypatch):
    monkeypatch.delenv(schema.DEBUG_ENV, raising=False)

    def fail():
        raise schema.SchemaError("shards/manifest.json: missing manifest field 'views'")

    with pytest.raises(SystemExit) as exit_info:
        schema.run_cli("prog", fail)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "prog: error: shards/manifest.json: missing manifest field 'views'\n"
    )
    with pytest.raises(schema.SchemaError):  # --debug keeps the traceback
        schema.run_cli("prog", fail, debug=True)
    with pytest.raises(ZeroDivisionError):  # a bug is never hidden
        schema.run_cli("prog", lambda: 1 / 0)
    assert schema.run_cli("prog", lambda: 7) == 7


def test_pop_debug_flag(monkeypatch):
    monkeypatch.delenv(schema.DEBUG_ENV, raising=False)
    assert schema.pop_debug_flag(["--a", "--debug", "b"]) == (["--a", "b"], True)
    assert schema.pop_debug_flag(["--a"]) == (["--a"], False)
    monkeypatch.setenv(schema.DEBUG_ENV, "1")
    assert schema.pop_debug_flag([]) == ([], True)
    monkeypatch.setenv(schema.DEBUG_ENV, "0")
    assert schema.pop_debug_flag([]) == ([], False)
