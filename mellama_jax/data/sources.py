"""Corpora as random-access document collections: JSONL, plain text, Parquet, array_record and TFDS.

Opening a source scans its files once for where each document is (JSONL line offsets, Parquet row counts,
array_record record counts), so the CPT mixture can visit documents in any seeded order, resume at an
index, and give every process a disjoint share. A document is read and checked only when visited: a
malformed one stops the run with an error naming its file and line/record, or with `on_error: skip`
is skipped and counted. Error messages never quote the text (clinical corpora are sensitive).

Formats: `jsonl` (one JSON object per line, text in `text_field`), `text` (one document per file),
`parquet` (a string column `text_field`), `array_record` (records are JSON objects like JSONL lines),
`tfds` (a prepared TFDS dataset split, read through `tfds.data_source`, without TensorFlow). With an
empty `text_field`, documents are whole records (SFT reads several fields).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import pathlib
from collections.abc import Sequence

import numpy as np

from mellama_jax.errors import UserError

log = logging.getLogger(__name__)

EXTENSIONS = {".jsonl": "jsonl", ".txt": "text", ".parquet": "parquet", ".array_record": "array_record"}
LOGGED_SKIPS = 5  # per source: where the first few skipped records are; after that only the count


def expand(patterns: Sequence[str]) -> list[pathlib.Path]:
    """Files named by paths, folders (every file below) and glob patterns, in sorted order, each once."""
    files: dict[pathlib.Path, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or [pattern]
        for match in map(pathlib.Path, matches):
            if match.is_dir():
                files.update(dict.fromkeys(sorted(f for f in match.rglob("*") if f.is_file())))
            elif match.is_file():
                files[match] = None
            else:
                raise UserError(f"{pattern}: no such file, folder or matching files")
    return list(files)


class BadRecord(Exception):
    """A malformed document; the message names where it is, never what it says."""


class Documents:
    """A source's documents, `get(i)` for i < len; a malformed one raises UserError or is skipped (None)."""

    skip_hint = "set data.on_error: skip"  # how the user asks to skip: `mellama prepare` names its flag

    def __init__(self, name: str, files: list[pathlib.Path], counts: list[int], on_error: str):
        self.name, self.files, self.on_error, self.skipped = name, files, on_error, 0
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if self.starts[-1] == 0:
            raise UserError(f"source {name}: no documents in {', '.join(map(str, files[:3]))}")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        file = int(np.searchsorted(self.starts, i, side="right")) - 1
        return file, i - int(self.starts[file])

    def read(self, file: int, local: int) -> str | dict:
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Document i's place, as an error names it: FILE:LINE, FILE:record N, FILE:row N or FILE."""
        raise NotImplementedError

    def get(self, i: int) -> str | dict | None:
        try:
            return self.read(*self._locate(i))
        except BadRecord as e:
            return self.reject(str(e))

    def reject(self, message: str) -> None:
        """A malformed document: a UserError, or with on_error "skip" a warning (place only) and a count."""
        if self.on_error == "raise":
            raise UserError(f"{message} ({self.skip_hint} to skip such records)")
        self.skipped += 1
        if self.skipped <= LOGGED_SKIPS:
            log.warning("source %s: skipped malformed record %d, %s", self.name, self.skipped, message)
        elif math.log10(self.skipped).is_integer():  # 10, 100, 1000, ...: the count, no more places
            log.warning("source %s: %d malformed records skipped so far", self.name, self.skipped)


def _field(record: object, field: str, where: str) -> str | dict:
    """The record's `field` string; with field "", the whole record (SFT reads several fields)."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not field:
        return record
    if field not in record:
        raise BadRecord(f"{where}: no {field!r} field")
    if not isinstance(record[field], str):
        raise BadRecord(f"{where}: field {field!r} is {type(record[field]).__name__}, not a string")
    return record[field]


def _json_text(raw: bytes, field: str, where: str) -> str | dict:
    try:
        return _field(json.loads(raw), field, where)
    except UnicodeDecodeError as e:
        raise BadRecord(f"{where}: not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadRecord(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None


class JsonlDocuments(Documents):
    """One document per non-blank line."""

    def __init__(self, name: str, files: list[pathlib.Path], field: str, on_error: str):
        self.field, self.offsets, self.lines = field, [], []
        for path in files:
            offsets, lines, position = [], [], 0
            with open(path, "rb") as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        offsets.append(position)
                        lines.append(number)
                    position += len(line)
            self.offsets.append(np.asarray(offsets, np.int64))
            self.lines.append(np.asarray(lines, np.int64))
        super().__init__(name, files, [len(o) for o in self.offsets], on_error)

    def where(self, i: int) -> str:
        file, local = self._locate(i)
        return f"{self.files[file]}:{self.lines[file][local]}"

    def read(self, file: int, local: int) -> str | dict:
        with open(self.files[file], "rb") as f:
            f.seek(int(self.offsets[file][local]))
            raw = f.readline().rstrip(b"\r\n")
        return _json_text(raw, self.field, f"{self.files[file]}:{self.lines[file][local]}")


class TextDocuments(Documents):
    """One document per file, UTF-8."""

    def __init__(self, name: str, files: list[pathlib.Path], on_error: str):
        super().__init__(name, files, [1] * len(files), on_error)

    def where(self, i: int) -> str:
        return str(self.files[i])

    def read(self, file: int, local: int) -> str:
        raw = self.files[file].read_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise BadRecord(f"{self.files[file]}:{line}: not UTF-8 (byte {e.start})") from None


class ParquetDocuments(Documents):
    """One document per row of the string column `field`."""

    def __init__(self, name: str, files: list[pathlib.Path], field: str, on_error: str):
        import pyarrow.parquet as pq

        self.field, self.tables, self.cached = field, [], (-1, -1, [])
        for path in files:
            try:
                table = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises its own error types for damaged files
                raise UserError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
            if field not in table.schema_arrow.names:
                raise UserError(f"{path}: no column {field!r} (columns: {', '.join(table.schema_arrow.names)})")
            self.tables.append(table)
        super().__init__(name, files, [t.metadata.num_rows for t in self.tables], on_error)

    def where(self, i: int) -> str:
        file, local = self._locate(i)
        return f"{self.files[file]}:row {local + 1}"

    def read(self, file: int, local: int) -> str:
        table = self.tables[file]
        group, first = 0, 0
        while first + table.metadata.row_group(group).num_rows <= local:
            first += table.metadata.row_group(group).num_rows
            group += 1
        if self.cached[:2] != (file, group):  # the mixture reads a row group's rows close together in time
            column = table.read_row_group(group, columns=[self.field]).column(0).to_pylist()
            self.cached = (file, group, column)
        value = self.cached[2][local - first]
        if not isinstance(value, str):
            raise BadRecord(f"{self.files[file]}:row {local + 1}: column {self.field!r} is {type(value).__name__}")
        return value


class ArrayRecordDocuments(Documents):
    """One document per record; a record is a JSON object like a JSONL line."""

    def __init__(self, name: str, files: list[pathlib.Path], field: str, on_error: str):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.field, self.readers = field, []
        for path in files:
            try:
                self.readers.append(ArrayRecordDataSource([str(path)]))
            except Exception as e:  # the C++ reader raises RuntimeError / ValueError variants
                raise UserError(f"{path}: not an array_record file ({str(e).splitlines()[0][:120]})") from None
        super().__init__(name, files, [len(r) for r in self.readers], on_error)

    def where(self, i: int) -> str:
        file, local = self._locate(i)
        return f"{self.files[file]}:record {local + 1}"

    def read(self, file: int, local: int) -> str | dict:
        return _json_text(self.readers[file][local], self.field, self.where(int(self.starts[file]) + local))


class TfdsDocuments(Documents):
    """One document per example of a prepared TFDS dataset split (array_record files; no TensorFlow needed)."""

    def __init__(self, name: str, dataset: str, split: str, data_dir: str, field: str, on_error: str):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise UserError(
                f"source {name}: format tfds needs tensorflow-datasets (pip install tensorflow-datasets)"
            ) from None
        try:
            self.source = tfds.data_source(dataset, split=split, data_dir=data_dir or None)
        except Exception as e:  # tfds raises its own not-found and format errors
            raise UserError(f"source {name}: tfds {dataset}[{split}]: {str(e).splitlines()[0][:200]}") from None
        self.field, self.label = field, f"tfds:{dataset}[{split}]"
        super().__init__(name, [pathlib.Path(self.label)], [len(self.source)], on_error)

    def where(self, i: int) -> str:
        return f"{self.label}:record {i + 1}"

    def read(self, file: int, local: int) -> str | dict:
        example, where = self.source[local], self.where(local)
        try:
            record = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in dict(example).items()}
        except UnicodeDecodeError as e:
            raise BadRecord(f"{where}: not UTF-8 (byte {e.start})") from None
        return _field(record, self.field, where)


def open_documents(
    name: str, patterns: Sequence[str], fmt: str, field: str, on_error: str, split: str = "train", data_dir: str = ""
) -> Documents:
    """The documents of one raw source; `fmt` "" picks the format from the files' extension."""
    if fmt == "tfds":
        if len(patterns) != 1:
            raise UserError(f"source {name}: a tfds source names one dataset, got {len(patterns)} paths")
        return TfdsDocuments(name, patterns[0], split, data_dir, field, on_error)
    files = expand(patterns)
    if not files:
        raise UserError(f"source {name}: {', '.join(patterns)} holds no files")
    if not fmt:
        kinds = {EXTENSIONS.get(f.suffix) for f in files}
        if len(kinds) != 1 or None in kinds:
            known = ", ".join(EXTENSIONS)
            raise UserError(f"source {name}: set its format; the file extensions do not say one ({known})")
        fmt = kinds.pop()
    readers = {"jsonl": JsonlDocuments, "parquet": ParquetDocuments, "array_record": ArrayRecordDocuments}
    if fmt == "text":
        return TextDocuments(name, files, on_error)
    if fmt in readers:
        return readers[fmt](name, files, field, on_error)
    raise UserError(f"source {name}: format {fmt!r} is not a raw format (jsonl, text, parquet, array_record, tfds)")
