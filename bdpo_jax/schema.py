"""What the PyTorch side and the JAX side agree on: the shard record schema, the batch field
names, the vote rule (PAPER.md Eqs. 6-7) and the CLI convention for user errors.

This module imports neither JAX nor torch (numpy only), so both sides use it; it is the only
module of bdpo_jax that scorers_torch imports.

One record is one preference pair (prompt, image 0, image 1). Binary layout of a
record (little endian):

    4 bytes  uint32   length N of the JSON header
    N bytes  utf-8    header: {"schema_version": int, "strings": {...},
                               "arrays": {name: [dtype, shape, offset]}}
    ...      raw      array bytes, each starting at `offset` from the start of the
                      payload (the byte after the header), 16-byte aligned

Arrays decode with `np.frombuffer` (no copy), so reading is cheap.

Fields (`V` = stored views: 1, or 2 when the horizontally flipped image is stored too;
`K` = number of scorers, named in the manifest's `scorer_names`):

    pair_id              str
    prompt               str
    moments_0, moments_1 float16 [V, 2, C, H, W]  VAE latent_dist mean (axis 1 index 0)
                                                  and log-variance (index 1), unscaled
    text_embeds          float16 [L, D]   encoder_hidden_states of the prompt
    pooled_text_embeds   float16 [P]      (SDXL only) pooled text embedding
    add_time_ids         float32 [6]      (SDXL only) original size, crop, target size
    scores               float32 [K, 2]   raw score of every scorer for image 0 and 1
    votes                int8    [K]      s_k = +1 if score_0 >= score_1 - tol else -1
    label                int8    []       majority label after the tie policy (+1, -1, 0)
    margin               int8    []       sum_k s_k
    human_label          float32 []       +1 image 0 preferred, -1 image 1, 0 tie,
                                          NaN when the dataset has no human label
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, TypeVar

import numpy as np

SCHEMA_VERSION = 1

MANIFEST_NAME = "manifest.json"
EMPTY_PROMPT_NAME = "empty_prompt.npz"  # text embeddings of "" for conditioning dropout
SHARD_SUFFIX = ".array_record"

STRING_FIELDS = ("pair_id", "prompt")
# name -> (dtype, number of dimensions, required)
ARRAY_FIELDS: dict[str, tuple[str, int, bool]] = {
    "moments_0": ("float16", 5, True),
    "moments_1": ("float16", 5, True),
    "text_embeds": ("float16", 2, True),
    "pooled_text_embeds": ("float16", 1, False),
    "add_time_ids": ("float32", 1, False),
    "scores": ("float32", 2, True),
    "votes": ("int8", 1, True),
    "label": ("int8", 0, True),
    "margin": ("int8", 0, True),
    "human_label": ("float32", 0, True),
}

# Numeric fields a training batch carries, in this order (the prompt strings stay out).
BATCH_FIELDS = (
    "moments_0",
    "moments_1",
    "text_embeds",
    "pooled_text_embeds",
    "add_time_ids",
    "scores",
    "votes",
    "label",
    "margin",
    "human_label",
)
# The batch fields the UNet and its conditioning read (the rest are labels and scores).
MODEL_INPUT_FIELDS = (
    "moments_0",
    "moments_1",
    "text_embeds",
    "pooled_text_embeds",
    "add_time_ids",
)

_ALIGN = 16


class UserError(Exception):
    """A user's mistake (a flag, config value, file or name): one line, exit code 2, no traceback.

    Raise it (or a subclass) with a message that names the culprit: the flag or config field,
    the file and line, or the unknown name and the valid ones.
    """


class SchemaError(UserError, ValueError):
    """A record or manifest does not follow this schema."""


class ConfigError(UserError, ValueError):
    """A config field or flag has a value the code cannot use (named in the message)."""


DEBUG_FLAG = "--debug"
DEBUG_ENV = "BDPO_DEBUG"
_T = TypeVar("_T")


def pop_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """(argv without `--debug`, whether tracebacks were asked for by flag or BDPO_DEBUG=1)."""
    rest = [arg for arg in argv if arg != DEBUG_FLAG]
    debug = len(rest) != len(argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return rest, debug


def run_cli(prog: str, main: Callable[[], _T], debug: bool = False) -> _T:
    """Run a CLI's `main`: a UserError becomes `prog: error: <message>` on stderr and exit 2.

    Any other exception is a bug and keeps its traceback; `debug` (from `pop_debug_flag`)
    keeps the traceback of user errors too.
    """
    try:
        return main()
    except UserError as error:
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the CLIs: a bad flag raises UserError, so `run_cli` prints one line."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def manifest_name(worker_index: int, num_workers: int) -> str:
    """Manifest file of one preprocessing worker (`manifest.json` for a single worker)."""
    return MANIFEST_NAME if num_workers == 1 else f"manifest-w{worker_index:03d}.json"


def shard_name(worker_index: int, shard_index: int) -> str:
    """File name of one shard; workers write disjoint names."""
    return f"shard-w{worker_index:03d}-{shard_index:05d}{SHARD_SUFFIX}"


def validate_record(record: Mapping[str, object]) -> None:
    """Raise SchemaError naming the field that is missing or malformed."""
    for name in STRING_FIELDS:
        if not isinstance(record.get(name), str):
            raise SchemaError(f"record field {name!r} must be a str, got {type(record.get(name))}")
    for name, (_dtype, ndim, required) in ARRAY_FIELDS.items():
        if name not in record:
            if required:
                raise SchemaError(f"record is missing required field {name!r}")
            continue
        value = np.asarray(record[name])
        if value.ndim != ndim:
            raise SchemaError(
                f"record field {name!r} must have {ndim} dimensions, got shape {value.shape}"
            )
    unknown = set(record) - set(STRING_FIELDS) - set(ARRAY_FIELDS)
    if unknown:
        raise SchemaError(f"record has unknown fields {sorted(unknown)}")
    k = np.asarray(record["scores"]).shape[0]
    if np.asarray(record["scores"]).shape != (k, 2) or np.asarray(record["votes"]).shape != (k,):
        raise SchemaError("record fields 'scores' [K, 2] and 'votes' [K] disagree on K")


def encode_record(record: Mapping[str, object]) -> bytes:
    """Serialise one pair to bytes (fields cast to the schema's dtypes)."""
    validate_record(record)
    arrays_meta: dict[str, list] = {}
    chunks: list[bytes] = []
    offset = 0
    for name, (dtype, _, _) in ARRAY_FIELDS.items():
        if name not in record:
            continue
        array = np.asarray(record[name], dtype=dtype)  # tobytes() writes C order
        pad = (-offset) % _ALIGN
        chunks.append(b"\0" * pad)
        offset += pad
        arrays_meta[name] = [dtype, list(array.shape), offset]
        raw = array.tobytes()
        chunks.append(raw)
        offset += len(raw)
    header = {
        "schema_version": SCHEMA_VERSION,
        "strings": {name: record[name] for name in STRING_FIELDS},
        "arrays": arrays_meta,
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * ((-(4 + len(header_bytes))) % _ALIGN)
    return struct.pack("<I", len(header_bytes)) + header_bytes + b"".join(chunks)


def decode_record(data: bytes) -> dict[str, object]:
    """Inverse of `encode_record`; arrays are read-only views into `data`."""
    if len(data) < 4:
        raise SchemaError(f"record of {len(data)} bytes is too short")
    (header_len,) = struct.unpack_from("<I", data, 0)
    try:
        header = json.loads(bytes(data[4 : 4 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SchemaError(f"record header is not valid JSON: {error}") from error
    version = header.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"record schema_version {version} does not match this code's {SCHEMA_VERSION}; "
            "re-run scorers_torch.preprocess with this version"
        )
    payload_start = 4 + header_len
    record: dict[str, object] = dict(header["strings"])
    for name, (dtype, shape, offset) in header["arrays"].items():
        count = int(np.prod(shape)) if shape else 1
        record[name] = np.frombuffer(
            data, dtype=dtype, count=count, offset=payload_start + offset
        ).reshape(shape)
    return record


def check_manifest_version(manifest: Mapping[str, object], path: str) -> None:
    """Raise SchemaError naming `path` when its schema version is not ours."""
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: schema_version {version} does not match this code's {SCHEMA_VERSION}"
        )


# --- votes (PAPER.md Eqs. 6-7) ------------------------------------------------------------------
#
#     s_k = +1 if r_k(x0) >= r_k(x1) - tol else -1      (Eq. 6; an exact tie keeps image 0,
#                                                        as the Diffusion-DPO authors' code)
#     margin = sum_k s_k,   label = sign(margin)        (Eq. 7; 0 = a tie when K is even)
#
# Labels use the record convention: +1 = image 0 preferred, -1 = image 1, 0 = tie.

TIE_POLICIES = ("drop", "human", "keep")


def votes_from_scores(scores_NxKx2: np.ndarray, tie_tolerance: float = 0.0) -> np.ndarray:
    """int8 [N, K] votes: +1 where score_0 >= score_1 - tie_tolerance, else -1."""
    scores_NxKx2 = np.asarray(scores_NxKx2, dtype=np.float64)
    if scores_NxKx2.ndim != 3 or scores_NxKx2.shape[-1] != 2:
        raise ValueError(f"scores must have shape [N, K, 2], got {scores_NxKx2.shape}")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    wins_NxK = scores_NxKx2[..., 0] >= scores_NxKx2[..., 1] - tie_tolerance
    return np.where(wins_NxK, 1, -1).astype(np.int8)


def majority(votes_NxK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label_N int8 = sign(sum_k s_k) in {-1, 0, 1}, margin_N int8 = sum_k s_k)."""
    votes_NxK = np.asarray(votes_NxK)
    if votes_NxK.ndim != 2:
        raise ValueError(f"votes must have shape [N, K], got {votes_NxK.shape}")
    margin_N = votes_NxK.astype(np.int64).sum(axis=1)
    return np.sign(margin_N).astype(np.int8), margin_N.astype(np.int8)


def apply_tie_policy(
    label_N: np.ndarray, human_label_N: np.ndarray, policy: str
) -> tuple[np.ndarray, np.ndarray]:
    """Resolve majority ties (label 0). Returns (label_N int8, keep_N bool).

    drop:  tied pairs are not kept.
    human: a tied pair takes the dataset's human label when it is +1 or -1; a pair whose
           human label is also a tie (0) or unknown (NaN) is dropped.
    keep:  tied pairs are kept with label 0 (e.g. for soft vote-share labels).
    """
    if policy not in TIE_POLICIES:
        raise ValueError(f"unknown tie policy {policy!r}; choose one of {TIE_POLICIES}")
    label_N = np.asarray(label_N, dtype=np.int8).copy()
    human_N = np.asarray(human_label_N, dtype=np.float64)
    tied_N = label_N == 0
    if policy == "keep":
        return label_N, np.ones_like(tied_N)
    if policy == "drop":
        return label_N, ~tied_N
    human_decides_N = tied_N & np.isin(human_N, (-1.0, 1.0))
    label_N[human_decides_N] = human_N[human_decides_N].astype(np.int8)
    return label_N, ~tied_N | human_decides_N


def agreement(votes_NxK: np.ndarray, reference_N: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-scorer fraction of pairs whose vote equals the reference label.

    Only pairs with a reference of +1 or -1 count (ties and NaN are skipped). Returns
    (fraction_K float64, NaN when no pair counts; number of pairs counted).
    """
    votes_NxK = np.asarray(votes_NxK)
    reference_N = np.asarray(reference_N, dtype=np.float64)
    counted_N = np.isin(reference_N, (-1.0, 1.0))
    count = int(counted_N.sum())
    if count == 0:
        return np.full(votes_NxK.shape[1], np.nan), 0
    same_NxK = votes_NxK[counted_N] == reference_N[counted_N, None]
    return same_NxK.mean(axis=0), count
