"""Corpus readers: plain text, JSONL and Parquet files -> a stream of (doc_id, text) documents.

One record is one document: a blank-line-separated block or a line of a text file
(`doc_separator="blank_line"|"line"`), a line of a JSONL file (the string field `text_field`), or a row
of a Parquet file (the string column `text_field`). Inputs may be files, directories (searched
recursively for known extensions) or glob patterns; files are read in sorted order, so the stream is
deterministic. `.gz` variants of the text and JSONL formats are read too.

Bad records never stop ingestion: empty or whitespace-only text, undecodable UTF-8, malformed JSON,
a JSON value that is not an object, a missing/null field or a non-string field are skipped and counted
by reason in an `IngestStats`.

doc_id is `"<path>:<n>"` where n is the 1-based line number of the record's first line (text, JSONL)
or the 0-based row index (Parquet).
"""
from __future__ import annotations

import glob as _glob
import gzip
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

__all__ = ["IngestStats", "SKIP_REASONS", "list_input_files", "iter_documents", "detect_format"]

SKIP_REASONS = ("empty", "whitespace_only", "bad_utf8", "bad_json", "not_an_object", "missing_field",
                "non_string_field")

_FORMATS = {
    ".txt": "text", ".text": "text", ".md": "text", ".txt.gz": "text",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".ndjson.gz": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
}
_BLANK = re.compile(rb"^[ \t\r\f\v]*$")


@dataclass
class IngestStats:
    """Counts of what ingestion read and skipped.

    files: number of files opened; records: records seen (kept + skipped); documents: records kept;
    skipped: reason -> count, reasons from `SKIP_REASONS`; first_skip: "file:line: reason" of the first skipped
    JSONL record (where a line is known), so a caller that wants every record can name the bad one.
    """

    files: int = 0
    records: int = 0
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skip: str = ""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, where: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        if where and not self.first_skip:
            self.first_skip = f"{where}: {reason}"
        self.records += 1
        self.skipped[reason] += 1

    def keep(self) -> None:
        self.records += 1
        self.documents += 1

    def to_dict(self) -> dict:
        return {"files": self.files, "records": self.records, "documents": self.documents,
                "skipped": {k: int(self.skipped[k]) for k in SKIP_REASONS if self.skipped[k]}}

    def merge(self, other: "IngestStats") -> "IngestStats":
        self.files += other.files
        self.records += other.records
        self.documents += other.documents
        self.skipped.update(other.skipped)
        return self

    def summary(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self.to_dict()["skipped"].items()) or "none"
        return (f"ingest: {self.files} files, {self.records} records, {self.documents} documents kept, "
                f"{self.num_skipped} skipped ({parts})")


def detect_format(path: str | os.PathLike) -> str | None:
    """'text' | 'jsonl' | 'parquet' from the file name, or None for an unknown extension."""
    name = os.fspath(path).lower()
    for ext in sorted(_FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return _FORMATS[ext]
    return None


def list_input_files(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, directories (recursive, known extensions only) and glob patterns into a file list.

    Order: inputs in the given order, each expanded in sorted order; duplicates are removed.
    Raises FileNotFoundError for a path that does not exist or a pattern/directory that matches nothing.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        s = os.fspath(item)
        if os.path.isdir(s):
            found = sorted(p for p in Path(s).rglob("*") if p.is_file() and detect_format(p)
                           and not any(part.startswith(".") for part in p.relative_to(s).parts))
            if not found:
                raise FileNotFoundError(f"input directory {s!r} holds no .txt/.jsonl/.parquet files")
        elif os.path.isfile(s):
            found = [Path(s)]
        elif _glob.has_magic(s):
            found = sorted(Path(p) for p in _glob.glob(s, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"input pattern {s!r} matches no files")
        else:
            raise FileNotFoundError(f"input path {s!r} does not exist")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                files.append(p)
    return files


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _check_text(raw: bytes | str, stats: IngestStats) -> str | None:
    """Decode and check one record; count and return None when it must be skipped."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("bad_utf8")
            return None
    if raw == "":
        stats.skip("empty")
        return None
    if not raw.strip():
        stats.skip("whitespace_only")
        return None
    return raw


def _iter_text(path: Path, doc_separator: str, stats: IngestStats) -> Iterator[tuple[str, str]]:
    with _open_binary(path) as f:
        if doc_separator == "line":
            for lineno, line in enumerate(f, 1):
                text = _check_text(line.rstrip(b"\r\n"), stats)
                if text is not None:
                    stats.keep()
                    yield f"{path}:{lineno}", text.strip()
            return
        block: list[bytes] = []
        start = 0
        for lineno, line in enumerate(f, 1):
            if _BLANK.match(line.rstrip(b"\n")):
                if block:
                    text = _check_text(b"".join(block).rstrip(b"\r\n"), stats)
                    if text is not None:
                        stats.keep()
                        yield f"{path}:{start}", text.strip()
                    block = []
                continue
            if not block:
                start = lineno
            block.append(line)
        if block:
            text = _check_text(b"".join(block).rstrip(b"\r\n"), stats)
            if text is not None:
                stats.keep()
                yield f"{path}:{start}", text.strip()


def _iter_jsonl(path: Path, text_field: str, stats: IngestStats) -> Iterator[tuple[str, str]]:
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines between JSON records are layout, not records
            try:
                line_s = line.decode("utf-8")
            except UnicodeDecodeError:
                stats.skip("bad_utf8", f"{path}:{lineno}")
                continue
            try:
                obj = json.loads(line_s)
            except json.JSONDecodeError:
                stats.skip("bad_json", f"{path}:{lineno}")
                continue
            if not isinstance(obj, dict):
                stats.skip("not_an_object", f"{path}:{lineno}")
                continue
            value = obj.get(text_field)
            if value is None:
                stats.skip("missing_field", f"{path}:{lineno}")
                continue
            if not isinstance(value, str):
                stats.skip("non_string_field", f"{path}:{lineno}")
                continue
            text = _check_text(value, stats)
            if text is not None:
                stats.keep()
                yield f"{path}:{lineno}", text.strip()


def _iter_parquet(path: Path, text_field: str, stats: IngestStats, batch_rows: int) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # truncated or not Parquet: name the file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"parquet file {str(path)!r} has no column {text_field!r}; columns: {names}")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            doc_id = f"{path}:{row}"
            row += 1
            if value is None:
                stats.skip("missing_field")
                continue
            if not isinstance(value, (str, bytes)):
                stats.skip("non_string_field")
                continue
            text = _check_text(value, stats)
            if text is not None:
                stats.keep()
                yield doc_id, text.strip()


def iter_documents(inputs: str | os.PathLike | Sequence[str | os.PathLike], *, doc_separator: str = "blank_line",
                   text_field: str = "text", file_format: str | None = None, stats: IngestStats | None = None,
                   parquet_batch_rows: int = 1024) -> Iterator[tuple[str, str]]:
    """Yield (doc_id, text) for every good record of `inputs`; bad records are counted in `stats`.

    Args:
        inputs: file(s), directory(ies) or glob pattern(s).
        doc_separator: for text files, "blank_line" (a document is a block of lines between blank lines)
            or "line" (every line is a document).
        text_field: the JSONL field / Parquet column holding the text.
        file_format: force "text" | "jsonl" | "parquet" for every file (default: from the extension).
        stats: an IngestStats to update (pass one in to read the counts afterwards).
    """
    if doc_separator not in ("blank_line", "line"):
        raise ValueError(f"doc_separator must be 'blank_line' or 'line', got {doc_separator!r}")
    if file_format not in (None, "text", "jsonl", "parquet"):
        raise ValueError(f"file_format must be None, 'text', 'jsonl' or 'parquet', got {file_format!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    if stats is None:
        stats = IngestStats()
    for path in list_input_files(inputs):
        fmt = file_format or detect_format(path)
        if fmt is None:
            raise ValueError(f"cannot tell the format of input file {str(path)!r}: use a .txt/.jsonl/.parquet "
                             f"extension or pass file_format")
        stats.files += 1
        if fmt == "text":
            yield from _iter_text(path, doc_separator, stats)
        elif fmt == "jsonl":
            yield from _iter_jsonl(path, text_field, stats)
        else:
            yield from _iter_parquet(path, text_field, stats, parquet_batch_rows)

