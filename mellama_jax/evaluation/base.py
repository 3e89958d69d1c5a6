"""What every MIBE task shares: `Example`, the `Task` base, file discovery and reading rows with their location.

A task's data file is either the hosted-eval schema of Me-LLaMA's harness (`clinicalnlplab/*_test` rows
`{id, query, answer, choices, gold}`: the prompt is `query` as given) or the dataset's original public format
(the task builds the prompt from the raw fields). Both can be JSONL, JSON or CSV; a row is hosted when it has a
`query`. Every bad row is a one-line `UserError` naming `file:line` (or `file: record N` inside a JSON array)
and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import pathlib
from collections.abc import Iterator
from typing import Any

from mellama_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Example:
    """One evaluation example, the same for hosted and original rows."""

    id: str  # the row's id (hosted `id`, pmid, row, index, ...), unique within the task
    prompt: str  # the zero-shot prompt the paper's harness builds: instruction, input, answer cue
    gold: str | tuple[str, ...]  # label / letter / span / reference text; HoC: tuple of hallmarks; NER: gold markup
    text: str  # the question/context the model reads (what the contamination check n-grams)
    choices: tuple[str, ...] = ()  # classification label set in choice order (what the paper parser scans), else ()


@dataclasses.dataclass(frozen=True)
class Row:
    """One input record, its 0-based position in the file and where it is (`file:line`) for error messages."""

    data: dict[str, Any]
    index: int
    where: str

    def error(self, field: str, problem: str) -> UserError:
        """A one-line error about `field` of this row."""
        return UserError(f"{self.where}: field '{field}' {problem}")

    def get(self, field: str, kind: type | tuple[type, ...] = str) -> Any:
        """The required field `field`, checked to be of `kind` (a str must not be blank)."""
        value = self.data.get(field)
        if value is None:
            raise UserError(f"{self.where}: missing field '{field}'")
        if isinstance(value, bool) or not isinstance(value, kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(field, f"must be {names}, got {type(value).__name__}")
        if isinstance(value, str) and not value.strip():
            raise self.error(field, "is empty")
        return value

    def first(self, fields: tuple[str, ...], kind: type | tuple[type, ...] = str) -> Any:
        """The first of several alternative field names that the row has (e.g. `premise` or `supp_set`)."""
        for field in fields:
            if self.data.get(field) is not None:
                return self.get(field, kind)
        raise UserError(f"{self.where}: missing field '{fields[0]}' (or {', '.join(repr(f) for f in fields[1:])})")

    def strings(self, field: str) -> list[str]:
        """A required list-of-strings field (e.g. PubMedQA `contexts`)."""
        value = self.get(field, list)
        if not value or not all(isinstance(v, str) for v in value):
            raise self.error(field, "must be a non-empty list of strings")
        return value


def not_utf8(path: pathlib.Path) -> UserError:
    """The error for a file whose bytes are not UTF-8 text, naming the line of the first bad byte."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return UserError(f"{path}:{line}: not UTF-8 text")
    return UserError(f"{path}: not UTF-8 text")


def read_text(path: pathlib.Path) -> str:
    """A UTF-8 text file's content, without a leading byte-order mark; other bytes are a one-line error."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def read_json(path: pathlib.Path) -> Any:
    """A JSON file's content; invalid JSON or text is a one-line error."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _json_rows(path: pathlib.Path) -> Iterator[Row]:
    data = read_json(path)
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        # PubMedQA's ori_pqal.json keys each row by its PMID.
        data = [{"_key": key, **value} for key, value in data.items()]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records (or JSON lines), got a {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise UserError(f"{path}: record {i}: expected a JSON object, got {type(item).__name__}")
        yield Row(item, i, f"{path}: record {i}")


def _jsonl_rows(path: pathlib.Path) -> Iterator[Row]:
    index = 0
    with path.open(encoding="utf-8-sig") as f:
        try:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(item, dict):
                    raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(item).__name__}")
                yield Row(item, index, f"{path}:{line_no}")
                index += 1
        except UnicodeDecodeError:  # the file is decoded in blocks: the line comes from its bytes
            raise not_utf8(path) from None


def _csv_rows(path: pathlib.Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        try:
            for index, item in enumerate(reader):
                # empty cells read as None, as a missing JSON field would; line_num is the record's last line
                yield Row({k: (v if v != "" else None) for k, v in item.items()}, index, f"{path}:{reader.line_num}")
        except UnicodeDecodeError:
            raise not_utf8(path) from None


def read_rows(path: pathlib.Path) -> Iterator[Row]:
    """The records of a `.jsonl`/`.txt` (JSON lines), `.json` (array) or `.csv`/`.tsv` file, with their location."""
    if path.suffix == ".json":
        return _json_rows(path)
    if path.suffix in (".csv", ".tsv"):
        return _csv_rows(path)
    return _jsonl_rows(path)


def _candidates(data_dir: pathlib.Path) -> list[str]:
    """Relative paths (posix) of files and folders up to two levels below `data_dir`."""
    found = []
    for child in sorted(data_dir.iterdir()):
        found.append(child.name)
        if child.is_dir():
            found.extend(f"{child.name}/{grandchild.name}" for grandchild in sorted(child.iterdir()))
    return found


def _matches(candidate: str, pattern: str) -> bool:
    """Case-insensitive glob match, part by part: `*` never crosses a `/`."""
    parts, globs = candidate.lower().split("/"), pattern.lower().split("/")
    return len(parts) == len(globs) and all(fnmatch.fnmatchcase(p, g) for p, g in zip(parts, globs, strict=True))


class Task:
    """One MIBE dataset: where its file is, how rows become `Example`s, the parsers and the metrics.

    Subclasses set the class attributes and implement `from_original` (the public format), `parse`,
    `parse_strict` and `score`; `answer_text` is what a 1-shot demonstration shows after its prompt.
    """

    name: str = ""
    title: str = ""
    suite = "mibe"  # "all" selects the MIBE suite; the demo corpus's tasks say "demo"
    metrics: tuple[str, ...] = ()
    paper: dict[str, float] = {}  # Me-LLaMA-70B-chat zero-shot numbers (DESIGN §2); read-only
    patterns: tuple[str, ...] = ()  # case-insensitive globs relative to --data-dir, tried in order

    def find(self, data_dir: pathlib.Path) -> pathlib.Path:
        """The task's file (or folder) in `data_dir`: the first pattern with a match; it must match exactly one."""
        data_dir = pathlib.Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir} is not a folder")
        candidates = _candidates(data_dir)
        for pattern in self.patterns:
            matches = [c for c in candidates if _matches(c, pattern)]
            if len(matches) > 1:
                raise UserError(f"{self.name}: several files in {data_dir} match {pattern!r}: {', '.join(matches)}")
            if matches:
                return data_dir / matches[0]
        raise UserError(f"{self.name}: no data file in {data_dir} (tried {', '.join(self.patterns)})")

    def has_data(self, data_dir: pathlib.Path) -> bool:
        """Whether any of the task's patterns matches in `data_dir` (a folder)."""
        return any(_matches(c, p) for c in _candidates(pathlib.Path(data_dir)) for p in self.patterns)

    def rows(self, path: pathlib.Path) -> Iterator[Row]:
        """The records of the task's file; tasks with nested or multi-file formats override this."""
        return read_rows(path)

    def load(self, data_dir: pathlib.Path, limit: int | None = None) -> list[Example]:
        """The task's examples from `data_dir` (hosted schema or original format), the first `limit` of them."""
        if limit is not None and limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        path = self.find(data_dir)
        examples: list[Example] = []
        seen: dict[str, str] = {}
        for row in self.rows(path):
            example = self.from_hosted(row) if "query" in row.data else self.from_original(row)
            if example is None:
                continue
            if example.id in seen:
                raise UserError(f"{row.where}: duplicate id {example.id!r} (first at {seen[example.id]})")
            seen[example.id] = row.where
            examples.append(example)
        if not examples:
            raise UserError(f"{path}: no examples")
        return examples[:limit]

    def from_hosted(self, row: Row) -> Example:
        """A hosted-schema row: the prompt is `query` as given, the gold comes from `answer` (or `choices[gold]`)."""
        query = row.get("query")
        text = row.data.get("text")
        gold, choices = self.hosted_gold(row)
        return Example(
            id=str(row.get("id", (str, int)) if "id" in row.data else row.index),
            prompt=query,
            gold=gold,
            text=text if isinstance(text, str) and text.strip() else query,
            choices=choices,
        )

    def hosted_gold(self, row: Row) -> tuple[str | tuple[str, ...], tuple[str, ...]]:
        """The gold and choices of a hosted row; generation tasks take `answer` and have no choices."""
        return row.get("answer"), ()

    def from_original(self, row: Row) -> Example | None:
        """An original-format row as an `Example` (None: a row the dataset itself marks as unusable)."""
        raise NotImplementedError

    def answer_text(self, example: Example) -> str:
        """The gold answer as the model should write it (a 1-shot demonstration's answer)."""
        return example.gold if isinstance(example.gold, str) else "; ".join(example.gold)

    def prompt(self, example: Example, shot: Example | None = None) -> str:
        """The prompt for `example`: its zero-shot prompt, after `shot` with its answer when given (1-shot)."""
        if shot is None:
            return example.prompt
        return f"{shot.prompt} {self.answer_text(shot)}\n\n{example.prompt}"

    def parse(self, output: str, example: Example) -> Any:
        """The paper-compatible parse of a model output (JSON-serialisable)."""
        raise NotImplementedError

    def parse_strict(self, output: str, example: Example) -> Any:
        """The strict parse: the answer must come first, in the asked-for form."""
        raise NotImplementedError

    def score(self, examples: list[Example], predictions: list) -> dict[str, Any]:
        """Metric name -> value over parsed predictions, in `metrics` order.

        A metric that cannot be computed here (BERTScore without its package or model) is None, and the dict then
        has a `skipped` entry: metric name -> the reason, for the harness to print.
        """
        raise NotImplementedError

    def check_lengths(self, examples: list[Example], predictions: list) -> None:
        """Scoring needs exactly one prediction per example."""
        if len(examples) != len(predictions) or not examples:
            raise ValueError(f"{self.name}: {len(predictions)} predictions for {len(examples)} examples")
