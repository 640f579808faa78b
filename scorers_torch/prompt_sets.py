"""Readers for the published evaluation prompt sets.

Formats (`format=` or detected from the path by `auto`):
- `pickapic`: Pick-a-Pic v2 parquet (split validation_unique, or the prompts-only
  pickapic_v2_no_images copy), column `caption`; a file or a folder of *.parquet files;
  duplicate captions are dropped (first occurrence kept).
- `parti`: PartiPrompts.tsv, tab separated with columns Prompt, Category, Challenge, Note;
  every row is kept (1,632), with Category/Challenge/Note in `meta`.
- `hpdv2`: HPDv2 test.json, a list of {"prompt", "image_path", "rank", "raw_annotations"}
  (400 prompts); a list of plain strings (the HPSv2 benchmark's per-style files) also works.
- `txt`: one prompt per line; blank lines skipped.
Prompt ids are the zero-padded row index in the set (after de-duplication), so a `limit`
keeps the ids of the full set.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from bdpo_jax.schema import UserError

FORMATS = ("pickapic", "parti", "hpdv2", "txt")
_SUFFIX_FORMATS = {".parquet": "pickapic", ".tsv": "parti", ".json": "hpdv2", ".txt": "txt"}
PARTI_COLUMNS = ("Prompt", "Category", "Challenge", "Note")


class PromptSetError(UserError, ValueError):
    """A prompt file that cannot be read as its format (names the file and line or entry)."""


class PromptFileNotFoundError(UserError, FileNotFoundError):
    """The prompt file does not exist."""


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: a stable id, its text, and metadata from the set (category...)."""

    id: str
    text: str
    meta: dict[str, str] = field(default_factory=dict)


def detect_format(path: str | Path) -> str:
    """Format name of a prompt file from its suffix (a folder means Pick-a-Pic parquet shards)."""
    path = Path(path)
    if path.is_dir():
        return "pickapic"
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PromptSetError(
            f"{path}: cannot tell the prompt format from the suffix {path.suffix!r}; "
            f"pass --prompt-format, one of {FORMATS}"
        )
    return fmt


def _read_pickapic(path: Path) -> list[tuple[str, dict[str, str]]]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise PromptSetError(f"{path}: folder holds no *.parquet files")
    captions: list[str] = []
    for file in files:
        names = pq.read_schema(file).names
        if "caption" not in names:
            raise PromptSetError(
                f"{file}: Pick-a-Pic parquet has no column 'caption' (has {names})"
            )
        # Only the caption column is read: the image columns of the full split are large.
        captions += pq.read_table(file, columns=["caption"]).column("caption").to_pylist()
    unique = dict.fromkeys(c.strip() for c in captions if c is not None and c.strip())
    return [(text, {}) for text in unique]


def _read_parti(path: Path) -> list[tuple[str, dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = reader.fieldnames or []
        if "Prompt" not in columns:
            raise PromptSetError(
                f"{path}: PartiPrompts TSV has no column 'Prompt' (columns {columns}); "
                f"expected tab-separated {PARTI_COLUMNS}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            text = (row.get("Prompt") or "").strip()
            if not text:
                raise PromptSetError(f"{path}: line {line} has an empty 'Prompt'")
            meta = {k: (row.get(k) or "") for k in PARTI_COLUMNS[1:] if k in columns}
            rows.append((text, meta))
    return rows


def _read_hpdv2(path: Path) -> list[tuple[str, dict[str, str]]]:
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise PromptSetError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(data, list):
        raise PromptSetError(
            f"{path}: HPDv2 JSON must be a list of entries, got {type(data).__name__}"
        )
    rows = []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            text = entry
        elif isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
            text = entry["prompt"]
        else:
            raise PromptSetError(f"{path}: entry {i} has no string 'prompt' key (HPDv2 test.json)")
        if not text.strip():
            raise PromptSetError(f"{path}: entry {i} has an empty prompt")
        rows.append((text.strip(), {}))
    return rows


def _read_txt(path: Path) -> list[tuple[str, dict[str, str]]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [(line.strip(), {}) for line in lines if line.strip()]


_READERS = {
    "pickapic": _read_pickapic,
    "parti": _read_parti,
    "hpdv2": _read_hpdv2,
    "txt": _read_txt,
}


def read_prompt_set(
    path: str | Path, format: str = "auto", limit: int | None = None
) -> list[Prompt]:
    """Read a prompt set; `limit` keeps the first N prompts (ids unchanged)."""
    path = Path(path)
    if not path.exists():
        raise PromptFileNotFoundError(f"prompt file {path} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in _READERS:
        raise PromptSetError(f"unknown prompt format {format!r}; use 'auto' or one of {FORMATS}")
    rows = _READERS[fmt](path)
    if not rows:
        raise PromptSetError(f"{path}: no prompts found (format {fmt})")
    if limit is not None and limit < 1:
        raise PromptSetError(f"prompt limit must be positive, got {limit}")
    width = max(5, len(str(len(rows) - 1)))
    prompts = [Prompt(f"{i:0{width}d}", text, meta) for i, (text, meta) in enumerate(rows)]
    return prompts[:limit] if limit is not None else prompts
