"""MIBE generation tasks: 2010 i2b2 concept NER (as markup), PubMed and MIMIC-CXR summarization.

Prompt wording: PubMed follows the zero-shot template of Biomedical-NLP-Benchmarks (BIDS-Xu-Lab) `GPT/templates.py`
key "pubmed". The i2b2 and MIMIC-CXR wordings were not found: ours are faithful equivalents in the same
TASK / INPUT / OUTPUT layout, asking for DESIGN §2's `<span class="...">` markup and for the impression.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

from mellama_jax.errors import UserError
from mellama_jax.evaluation.base import Example, Row, read_rows, read_text
from mellama_jax.evaluation.kinds import NERTask, SummaryTask

_I2B2 = (
    "TASK: Your task is to mark the medical problems, treatments and tests in a sentence from a clinical note.\n"
    "INPUT: The input is a sentence from a clinical note.\n"
    'OUTPUT: The same sentence, word for word, with each problem wrapped as <span class="problem">...</span>, '
    'each treatment as <span class="treatment">...</span> and each test as <span class="test">...</span>.\n\n'
    "INPUT: {input}\n\nOUTPUT:"
)
_PUBMED = (
    "***TASK*** the task is to summarize an input biomedical literature in six sentences\n"
    "***INPUT*** the input is a biomedical literature ***OUTPUT*** the output is the summary of an input "
    "biomedical literature in six sentences\n\n"
    "Input: {input}\nOutput:"
)
_MIMIC_CXR = (
    "TASK: Your task is to summarize the findings of a chest X-ray radiology report into its impression.\n"
    "INPUT: The input is the findings section of a radiology report.\n"
    "OUTPUT: The impression: a short summary of the most important findings.\n\n"
    "INPUT: {input}\n\nOUTPUT:"
)

# 2010 i2b2/VA concept annotation: `c="chest pain" 12:3 12:4||t="problem"` = line 12 (1-based), whitespace
# tokens 3..4 (0-based, inclusive) of the note's .txt file (the layout public readers of the release parse, e.g.
# EmilyAlsentzer/clinicalBERT's preprocessing: 'c="asymptomatic" 16:2 16:2||t="problem"').
_CONCEPT = re.compile(r'^c="(.*)"\s+(\d+):(\d+)\s+(\d+):(\d+)\|\|t="(\w+)"\s*$')


def _concepts(con: pathlib.Path, lines: list[str]) -> dict[int, list[tuple[int, int, str]]]:
    """The concepts of one note by line number: (first token, last token, type), checked against the text."""
    by_line: dict[int, list[tuple[int, int, str]]] = {}
    for number, entry in enumerate(read_text(con).splitlines(), 1):
        if not entry.strip():
            continue
        match = _CONCEPT.match(entry.strip())
        if match is None:
            raise UserError(f'{con}:{number}: expected c="..." line:token line:token||t="type"')
        words, line, first, end_line, last, kind = match.groups()
        line, first, end_line, last = int(line), int(first), int(end_line), int(last)
        tokens = lines[line - 1].split() if 1 <= line <= len(lines) else []
        if end_line != line or not 0 <= first <= last < len(tokens):
            raise UserError(f"{con}:{number}: offsets {line}:{first} {end_line}:{last} are outside the note's text")
        if " ".join(tokens[first : last + 1]).lower() != words.lower():
            # the words stay out of the message: they are a clinical note's text
            raise UserError(f"{con}:{number}: the concept's words do not match the note's tokens at {line}:{first}")
        by_line.setdefault(line, []).append((first, last, kind))
    return by_line


def _markup(tokens: list[str], spans: list[tuple[int, int, str]], where: str) -> str:
    """The line's tokens with each concept wrapped in `<span class="type">`."""
    out, position = [], 0
    for first, last, kind in sorted(spans):
        if first < position:
            raise UserError(f"{where}: overlapping concepts")
        out += tokens[position:first]
        out.append(f'<span class="{kind}">{" ".join(tokens[first : last + 1])}</span>')
        position = last + 1
    return " ".join(out + tokens[position:])


class I2B2(NERTask):
    """2010 i2b2/VA concepts (problem, treatment, test) as `<span class>` markup over one note line."""

    name, title = "i2b2", "2010 i2b2"
    patterns = ("i2b2*.json*", "i2b2*")

    def rows(self, path: pathlib.Path) -> Iterator[Row]:
        """A folder of notes (`*.txt`) and their concepts (`*.con`, same name, anywhere below): one row per
        non-empty note line; a JSON/JSONL file: its rows."""
        if not path.is_dir():
            yield from read_rows(path)
            return
        concept_files: dict[str, pathlib.Path] = {}
        for con in sorted(path.rglob("*.con")):
            if con.stem in concept_files:
                raise UserError(f"{con}: a second concept file for note {con.stem!r} ({concept_files[con.stem]})")
            concept_files[con.stem] = con
        notes = sorted(path.rglob("*.txt"))
        if not notes:
            raise UserError(f"{path}: no note files (*.txt)")
        index = 0
        for note in notes:
            if note.stem not in concept_files:
                raise UserError(f"{note}: no concept file {note.stem}.con below {path}")
            lines = read_text(note).split("\n")
            concepts = _concepts(concept_files[note.stem], lines)
            for number, line in enumerate(lines, 1):
                tokens = line.split()
                if tokens:
                    markup = _markup(tokens, concepts.get(number, []), f"{concept_files[note.stem]} line {number}")
                    record = {"id": f"{note.stem}:{number}", "sentence": " ".join(tokens), "markup": markup}
                    yield Row(record, index, f"{note}:{number}")
                    index += 1

    def from_original(self, row: Row) -> Example:
        """A note line (`sentence`) and its gold `markup`."""
        sentence = row.get("sentence")
        return Example(row.get("id"), _I2B2.format(input=sentence), row.get("markup"), sentence)


def _sentences(row: Row, field: str) -> list[str]:
    value = row.get(field, list)
    if not all(isinstance(v, str) for v in value):
        raise row.error(field, "must be a list of strings")
    return value


class PubMedSumm(SummaryTask):
    """PubMed article -> abstract (Cohan et al. 2018, test split)."""

    name, title = "pubmed_summ", "PubMed summarization"
    patterns = ("pubmed_summ*.json*", "pubmed_summ*.txt", "pubmed-dataset/test.txt", "pubmed_summ*/test.txt")

    def from_original(self, row: Row) -> Example | None:
        """Cohan et al. (armancohan/long-summarization: `train.txt`/`val.txt`/`test.txt`, one JSON paper per line):
        `article_id`, `article_text` (sentences), `abstract_text` (sentences wrapped in `<S>` `</S>`). Papers
        without text or abstract are skipped: there is nothing to summarize or to compare with."""
        article = " ".join(s.strip() for s in _sentences(row, "article_text") if s.strip())
        abstract = " ".join(
            s.replace("<S>", " ").replace("</S>", " ").strip() for s in _sentences(row, "abstract_text")
        ).strip()
        if not article or not abstract:
            return None
        abstract = " ".join(abstract.split())
        return Example(str(row.get("article_id", (str, int))), _PUBMED.format(input=article), abstract, article)


_SECTION = re.compile(r"^\s*([A-Z][A-Z /]+):", re.MULTILINE)


def _sections(report: str) -> dict[str, str]:
    """A MIMIC-CXR report's `HEADER:` sections by lower-cased header, whitespace collapsed."""
    heads = list(_SECTION.finditer(report))
    if not heads:
        return {}
    ends = [h.start() for h in heads[1:]] + [len(report)]
    spans = zip(heads, ends, strict=True)
    return {head.group(1).strip().lower(): " ".join(report[head.end() : end].split()) for head, end in spans}


class MimicCXR(SummaryTask):
    """MIMIC-CXR findings -> impression."""

    name, title = "mimic_cxr", "MIMIC-CXR summarization"
    patterns = ("mimic_cxr*.json*", "mimic-cxr*.json*", "mimic_cxr*.csv", "mimic-cxr*.csv")

    def from_original(self, row: Row) -> Example | None:
        """Rows as the MEDIQA 2021 RRS script writes them (abachaa/MEDIQA2021 `Task3/make_mimic_data.py`):
        `study_id`, `findings`, `impression` (+ `subject_id`, `background`), as JSON, JSON lines or CSV; or a raw
        `report` with FINDINGS: / IMPRESSION: sections (reports lacking either are skipped, as that script does)."""
        if "findings" in row.data or "impression" in row.data:
            findings, impression = row.get("findings"), row.get("impression")
        else:
            sections = _sections(row.get("report"))
            findings, impression = sections.get("findings"), sections.get("impression")
            if not findings or not impression:
                return None
        example_id = str(row.data["study_id"]) if row.data.get("study_id") is not None else str(row.index)
        return Example(example_id, _MIMIC_CXR.format(input=findings), impression, findings)
