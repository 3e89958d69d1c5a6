"""MIBE question answering: PubMedQA, MedQA (5 and 4 options), MedMCQA, EmrQA.

Prompt wording: PubMedQA and MedQA follow the zero-shot templates of Biomedical-NLP-Benchmarks (BIDS-Xu-Lab,
the lab behind Me-LLaMA's harness), `GPT/templates.py` keys "pubmedqa", "medqa5" (5 options) and "medqa"
(4 options); MedMCQA (4 options) uses the 4-option MedQA template. EmrQA's wording was not found there: ours
is a faithful equivalent in the same TASK / INPUT / OUTPUT layout.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

from mellama_jax.errors import UserError
from mellama_jax.evaluation.base import Example, Row, read_json, read_rows
from mellama_jax.evaluation.kinds import ChoiceTask, SpanTask

_PUBMEDQA = (
    "TASK: Your task is to answer biomedical questions using the given abstract. "
    "Only output yes, no, or maybe as answer.\n"
    "INPUT: The input is a question followed by an abstract.\n"
    "OUTPUT: Answer each question by providing one of the following options: yes, no, maybe.\n\n"
    "INPUT: {input}\n\nOUTPUT:"
)
_MEDQA5 = (
    "Task: Your task is to answer medical questions with the provided choices. "
    "Only output the answer option (A/B/C/D/E) as answer.\n"
    "Input Format: The input consists of a question followed by several choices.\n"
    "Output: Answer each question by providing one of the following options: A, B, C, D, E.\n\n"
    "Input: {input}\nOutput:"
)
_MEDQA4 = (
    "TASK: Your task is to answer medical questions with the provided choices. "
    "Only output the answer option (A/B/C/D) as answer.\n"
    "INPUT: The input is a question followed by several choices.\n"
    "OUTPUT: Answer each question by providing one of the following options: A, B, C, D.\n\n"
    "INPUT: {input}\n\nOUTPUT:"
)
_EMRQA = (
    "TASK: Your task is to answer a question about a clinical note by extracting the answer from the note. "
    "Only output the text span from the note that answers the question.\n"
    "INPUT: The input is a clinical note followed by a question.\n"
    "OUTPUT: The exact text span from the note that answers the question.\n\n"
    "INPUT: {input}\n\nOUTPUT:"
)


class PubMedQA(ChoiceTask):
    """PubMedQA PQA-L test (500): yes / no / maybe from the question and the abstract without its conclusion."""

    name, title = "pubmedqa", "PubMedQA"
    paper = {"accuracy": 0.768}
    patterns = ("pubmedqa*.json*", "ori_pqal.json")
    choices = ("yes", "no", "maybe")

    def from_original(self, row: Row) -> Example:
        """Official fields: `pmid` (or the ori_pqal.json key), `question`, `contexts`, `final_decision`."""
        pmid = str(row.get("pmid", (str, int)) if "pmid" in row.data else row.get("_key"))
        text = f"{row.get('question')} {' '.join(row.strings('contexts'))}"
        gold = self.label(row, "final_decision", row.get("final_decision"))
        return Example(pmid, _PUBMEDQA.format(input=text), gold, text, self.choices)


def _options(row: Row, letters: str) -> str:
    """The `options` dict {"A": ..., ...} as "A. text" lines, checked to hold exactly `letters`."""
    options = row.get("options", dict)
    if sorted(options) != list(letters) or not all(isinstance(v, str) and v.strip() for v in options.values()):
        raise row.error("options", f"must map each of {', '.join(letters)} to a non-empty string")
    return "\n".join(f"{letter}. {options[letter]}" for letter in letters)


class MedQA(ChoiceTask):
    """MedQA-USMLE test (1,273), options A-E: the variant Me-LLaMA evaluates."""

    name, title = "medqa", "MedQA"
    paper = {"accuracy": 0.523}
    patterns = ("medqa*5opt*.json*", "medqa*5_opt*.json*", "medqa_test*.json*", "medqa.json*")
    choices = ("A", "B", "C", "D", "E")
    keep_case, letters = True, True
    template = _MEDQA5

    def from_original(self, row: Row) -> Example:
        """Fields: `question`, `options` {letter: text}, `answer_idx` (gold letter), `row` (id, when present)."""
        letters = "".join(self.choices)
        text = f"{row.get('question')}\n{_options(row, letters)}"
        gold = self.label(row, "answer_idx", row.get("answer_idx"))
        example_id = str(row.get("row", int)) if "row" in row.data else str(row.index)
        return Example(example_id, self.template.format(input=text), gold, text, self.choices)


class MedQA4(MedQA):
    """MedQA-USMLE test, the 4-option (A-D) release."""

    name, title = "medqa_4opt", "MedQA (4 options)"
    paper = {}  # Me-LLaMA reports the 5-option variant only
    patterns = ("medqa*4opt*.json*", "medqa*4_opt*.json*")
    choices = ("A", "B", "C", "D")
    template = _MEDQA4


class MedMCQA(ChoiceTask):
    """MedMCQA dev (4,183, used as test), options A-D."""

    name, title = "medmcqa", "MedMCQA"
    paper = {"accuracy": 0.539}
    patterns = ("medmcqa*.json*",)
    choices = ("A", "B", "C", "D")
    keep_case, letters = True, True

    def from_original(self, row: Row) -> Example:
        """Official fields: `id`, `question`, `opa`..`opd`, `cop` = the correct option, 1-based (1 = opa).

        (The Hugging Face copy's `cop` is 0-based; this reads the official release.)
        """
        options = "\n".join(f"{letter}. {row.get(f'op{letter.lower()}')}" for letter in self.choices)
        text = f"{row.get('question')}\n{options}"
        cop = row.get("cop", int)
        if not 1 <= cop <= 4:
            raise row.error("cop", f"must be 1-4 (1-based: 1 = opa), got {cop}")
        return Example(str(row.get("id")), _MEDQA4.format(input=text), self.choices[cop - 1], text, self.choices)


def _text(row: Row, field: str) -> str:
    """A str field, or emrQA's list of lines / of paraphrases (joined, or the first question)."""
    value = row.get(field, (str, list))
    if isinstance(value, str):
        return value
    if not value or not all(isinstance(v, str) for v in value):
        raise row.error(field, "must be a string or a non-empty list of strings")
    return "\n".join(value) if field == "context" else value[0]


class EmrQA(SpanTask):
    """EmrQA: extract the span of a clinical note that answers the question; EM and token F1."""

    name, title = "emrqa", "EmrQA"
    patterns = ("emrqa*.json*",)

    def rows(self, path: pathlib.Path) -> Iterator[Row]:
        """SQuAD-style `{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}`
        flattened to one row per question; other files as rows. The emrQA release's own variant (the note as a
        list of lines, a list of question paraphrases, non-string ids) is read too; that variant is described
        from the release, not re-checked against a public copy."""
        if path.suffix != ".json":
            yield from read_rows(path)
            return
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise UserError(f"{path}: expected SQuAD-style JSON with a 'data' list")
        index = 0
        for d, article in enumerate(data["data"]):
            for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
                where = f"{path}: data[{d}].paragraphs[{p}]"
                if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                    raise UserError(f"{where}: missing field 'qas'")
                for q, qa in enumerate(paragraph["qas"]):
                    if not isinstance(qa, dict):
                        raise UserError(f"{where}.qas[{q}]: expected a JSON object")
                    qa_id = qa.get("id") if isinstance(qa.get("id"), str) else f"{d}.{p}.{q}"
                    record = {"context": paragraph.get("context"), **qa, "id": qa_id}
                    yield Row(record, index, f"{where}.qas[{q}]")
                    index += 1

    def from_original(self, row: Row) -> Example:
        """A question with its note (`context`) and `answers` [{"text", ...}]; the gold is the first answer."""
        context, question = _text(row, "context"), _text(row, "question")
        answers = row.get("answers", list)
        if not answers or not isinstance(answers[0], dict) or not isinstance(answers[0].get("text"), str):
            raise row.error("answers", 'must be a non-empty list of {"text": ...}')
        text = f"{context}\nQuestion: {question}"
        return Example(str(row.get("id", (str, int))), _EMRQA.format(input=text), answers[0]["text"], text)
