"""Reading preference pairs: Pick-a-Pic v2 parquet, generic parquet or JSONL; image decoding.

Pick-a-Pic v2 columns used: caption, jpg_0, jpg_1 (JPEG bytes), label_0, label_1 (1/0, 0/1
or 0.5/0.5), ranking_id when present (the pair id). Generic files have prompt, image_0,
image_1 (a path relative to the file, or bytes; in JSONL bytes are base64 under
{"bytes": "..."}) and optionally human_label (+1 image 0 preferred, -1 image 1, 0 tie).
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor

import PIL.Image

from bdpo_jax.schema import UserError

FORMATS = ("pickapic", "generic")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
GENERIC_COLUMNS = ("prompt", "image_0", "image_1")
log = logging.getLogger(__name__)
_BATCH_ROWS = 64  # parquet rows decoded at a time (Pick-a-Pic rows hold two JPEGs each)


@dataclasses.dataclass
class Pair:
    """One input pair; `image_0`/`image_1` are encoded bytes or a path."""

    index: int  # position in the input stream (all files, in order)
    pair_id: str
    prompt: str
    image_0: bytes | str
    image_1: bytes | str
    human_label: float  # +1, -1, 0 (tie) or NaN (unknown)


class InputError(UserError, ValueError):
    """An input file is malformed as a whole or on a line (names the file and the column/line).

    Fatal, unlike an undecodable image, which only skips its pair (see `decode_pairs`).
    """


class InputNotFoundError(UserError, FileNotFoundError):
    """An `--input` path or glob matches no file."""


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files matching the comma-separated paths/globs, sorted within each pattern."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputNotFoundError(f"--input {pattern!r} matches no file")
        for path in matches:
            if not os.path.isfile(path):
                raise InputNotFoundError(f"--input file {path!r} does not exist")
            files.append(path)
    return files


def pickapic_human_label(label_0: float, label_1: float) -> float:
    """+1 when label_0 == 1, -1 when label_1 == 1, 0 for 0.5/0.5, NaN otherwise."""
    if label_0 == 1:
        return 1.0
    if label_1 == 1:
        return -1.0
    if label_0 == 0.5 and label_1 == 0.5:
        return 0.0
    return math.nan


def _generic_human_label(value: object, where: str) -> float:
    if value is None:
        return math.nan
    try:
        label = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: human_label {value!r} is not a number") from None
    if not (math.isnan(label) or label in (-1.0, 0.0, 1.0)):
        raise InputError(f"{where}: human_label must be -1, 0, 1 or empty, got {value!r}")
    return label


def _generic_image(value: object, base_dir: str, where: str) -> bytes | str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and "bytes" in value:  # JSONL base64 or HF Image struct
        data = value["bytes"]
        return base64.b64decode(data) if isinstance(data, str) else bytes(data)
    if isinstance(value, str):
        return value if os.path.isabs(value) else os.path.join(base_dir, value)
    raise InputError(f"{where}: image must be a path or bytes, got {type(value).__name__}")


def _open_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise InputError(f"{path}: not a readable parquet file ({err})") from err


def _check_columns(path: str, parquet, columns: Sequence[str]) -> set[str]:
    """The column names of `parquet`; InputError when one of `columns` is missing."""
    names = set(parquet.schema_arrow.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; it has {sorted(names)}")
    return names


def _parquet_rows(
    path: str, columns: Sequence[str], optional: Sequence[str], wanted: Callable[[int], bool]
) -> Iterator[tuple[int, dict | None]]:
    """(row index, row) of the file; row is None for unwanted rows of a row group that holds a
    wanted one, and row groups without any wanted row are not read at all."""
    parquet = _open_parquet(path)
    names = _check_columns(path, parquet, columns)
    wanted_columns = list(columns) + [c for c in optional if c in names]
    start = 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        if any(wanted(row) for row in range(start, start + size)):
            table = parquet.read_row_group(group, columns=wanted_columns)
            for offset in range(0, size, _BATCH_ROWS):
                rows = table.slice(offset, _BATCH_ROWS).to_pylist()
                for j, row in enumerate(rows):
                    index = start + offset + j
                    yield index, row if wanted(index) else None
        start += size


def _pickapic_pairs(path: str, wanted: Callable[[int], bool]) -> Iterator[tuple]:
    name = os.path.basename(path)
    for row_index, row in _parquet_rows(path, PICKAPIC_COLUMNS, ("ranking_id",), wanted):
        if row is None:
            continue
        pair_id = row.get("ranking_id")
        pair_id = f"{name}:{row_index}" if pair_id is None else str(pair_id)
        label = pickapic_human_label(row["label_0"], row["label_1"])
        yield row_index, (pair_id, row["caption"] or "", row["jpg_0"], row["jpg_1"], label)


def _jsonl_lines(path: str) -> Iterator[tuple[str, str]]:
    line_number = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path}:{line_number}", line
    except UnicodeDecodeError as err:
        raise InputError(f"{path}:{line_number + 1}: not UTF-8 text ({err.reason})") from None


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


def _jsonl_row(where: str, line: str) -> dict:
    """One generic JSONL line as a dict with the required fields; InputError naming the line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: invalid JSON ({err})") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [c for c in GENERIC_COLUMNS if c not in row]
    if missing:
        raise InputError(f"{where}: missing field(s) {missing}")
    return row


def _generic_rows(path: str, wanted: Callable[[int], bool]) -> Iterator[tuple[int, str, dict]]:
    if _is_jsonl(path):
        for row_index, (where, line) in enumerate(_jsonl_lines(path)):
            if wanted(row_index):
                yield row_index, where, _jsonl_row(where, line)
    else:
        optional = ("human_label", "pair_id")
        for row_index, row in _parquet_rows(path, GENERIC_COLUMNS, optional, wanted):
            if row is not None:
                yield row_index, f"{path}:row {row_index}", row


def _generic_pairs(path: str, wanted: Callable[[int], bool]) -> Iterator[tuple]:
    base_dir, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    for row_index, where, row in _generic_rows(path, wanted):
        pair_id = row.get("pair_id")
        pair_id = f"{name}:{row_index}" if pair_id is None else str(pair_id)
        yield (
            row_index,
            (
                pair_id,
                str(row["prompt"]),
                _generic_image(row["image_0"], base_dir, where),
                _generic_image(row["image_1"], base_dir, where),
                _generic_human_label(row.get("human_label"), where),
            ),
        )


def count_pairs(files: Sequence[str], fmt: str, check_until: float = 0) -> int:
    """Number of pairs in `files` (parquet: from the metadata, JSONL: non-empty lines).

    Pairs with index < `check_until` are checked, so that whole-input problems fail before
    any model loads: a parquet file lacking a column, a JSONL line that is not a JSON object
    with the required fields.
    """
    total = 0
    for path in files:
        if fmt == "generic" and _is_jsonl(path):
            for where, line in _jsonl_lines(path):
                if total < check_until:
                    _jsonl_row(where, line)
                total += 1
        else:
            parquet = _open_parquet(path)
            if total < check_until:
                _check_columns(
                    path, parquet, PICKAPIC_COLUMNS if fmt == "pickapic" else GENERIC_COLUMNS
                )
            total += parquet.metadata.num_rows
    return total


def read_pairs(
    files: Sequence[str],
    fmt: str,
    wanted: Callable[[int], bool] = lambda index: True,
    stop: int | None = None,
) -> Iterator[Pair]:
    """The pairs of `files` whose index (0, 1, 2, ... across files, in order) is `wanted`,
    up to index `stop` (exclusive); unwanted parquet row groups are never read."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {FORMATS}")
    reader = _pickapic_pairs if fmt == "pickapic" else _generic_pairs
    offset = 0
    for path in files:
        if stop is not None and offset >= stop:
            return
        size = count_pairs([path], fmt)
        local_wanted = lambda row, base=offset: (  # noqa: E731
            (stop is None or base + row < stop) and wanted(base + row)
        )
        for row_index, fields in reader(path, local_wanted):
            yield Pair(offset + row_index, *fields)
        offset += size


def decode_image(source: bytes | str | None) -> PIL.Image.Image:
    """RGB image from encoded bytes or a path; raises ValueError with a short reason."""
    if source is None:
        raise ValueError("missing")
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError:
        raise ValueError("unreadable file") from None
    with stream:
        try:
            image = PIL.Image.open(stream)
            image.load()
        except (OSError, PIL.Image.DecompressionBombError, SyntaxError, ValueError):
            raise ValueError("undecodable") from None
    return image.convert("RGB")


def _decode_or_error(source: bytes | str) -> object:
    """The decoded image, or the ValueError saying why it could not be decoded."""
    try:
        return decode_image(source)
    except ValueError as err:
        return err


def decode_pairs(batch: list[Pair], counts: dict, pool: Executor) -> list[tuple]:
    """(pair, image_0, image_1) of the decodable pairs, decoded on `pool`; the others are
    counted in counts["skipped"][reason] and logged with their pair id and image."""
    decoded = list(
        pool.map(_decode_or_error, [src for p in batch for src in (p.image_0, p.image_1)])
    )
    good = []
    for n, pair in enumerate(batch):
        images = decoded[2 * n : 2 * n + 2]
        named = zip(("image_0", "image_1"), images, strict=True)
        bad = [(which, err) for which, err in named if isinstance(err, ValueError)]
        if bad:
            which, err = bad[0]
            reason = f"{str(err).replace(' ', '_')}_image"
            counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1
            log.warning("skipping pair %s: %s is %s", pair.pair_id, which, err)
        else:
            good.append((pair, *images))
    return good
