"""The five kinds of MIBE task: parsers and metrics shared by the datasets of each kind.

A dataset task (mibe_qa.py, mibe_class.py, mibe_gen.py) subclasses one kind and adds its file patterns,
its original-format reader and its prompt.
"""

from __future__ import annotations

from typing import Any

from mellama_jax.evaluation import metrics, parsers
from mellama_jax.evaluation.base import Example, Row, Task


def hosted_choices(row: Row) -> tuple[str, ...]:
    """A hosted row's `choices`: a non-empty list of distinct strings."""
    choices = row.get("choices", list)
    if not choices or not all(isinstance(c, str) and c for c in choices) or len(set(choices)) != len(choices):
        raise row.error("choices", "must be a non-empty list of distinct strings")
    return tuple(choices)


def hosted_index(row: Row, choices: tuple[str, ...]) -> int:
    """A hosted row's `gold`: an index into `choices`."""
    gold = row.get("gold", int)
    if not 0 <= gold < len(choices):
        raise row.error("gold", f"must index choices (0..{len(choices) - 1}), got {gold}")
    return gold


class ChoiceTask(Task):
    """Single-label classification: the gold is one of `choices`; accuracy and macro-F1.

    `keep_case` (MedQA, MedMCQA: letters) makes the paper parser case-sensitive; `letters` makes the strict
    parser expect an option letter.
    """

    metrics = ("accuracy", "macro_f1")
    choices: tuple[str, ...] = ()
    keep_case = False
    letters = False

    def hosted_gold(self, row: Row) -> tuple[str, tuple[str, ...]]:
        """A hosted row: gold = `choices[gold]`, choices as the row lists them (the order the paper parser scans)."""
        choices = hosted_choices(row)
        return choices[hosted_index(row, choices)], choices

    def label(self, row: Row, field: str, value: str) -> str:
        """`value` checked to be one of the task's labels."""
        if value not in self.choices:
            raise row.error(field, f"must be one of {', '.join(self.choices)}, got {value!r}")
        return value

    def parse(self, output: str, example: Example) -> str:
        """The first choice occurring in the output, else "missing"."""
        return parsers.first_choice(output, example.choices, self.keep_case)

    def parse_strict(self, output: str, example: Example) -> str:
        """The label (or option letter) the answer starts with, else "missing"."""
        if self.letters:
            return parsers.strict_letter(output, example.choices)
        return parsers.strict_label(output, example.choices)

    def score(self, examples: list[Example], predictions: list) -> dict[str, Any]:
        """Accuracy and macro-F1 over the gold label set (sklearn)."""
        self.check_lengths(examples, predictions)
        golds = [e.gold for e in examples]
        return {"accuracy": metrics.accuracy(golds, predictions), "macro_f1": metrics.macro_f1(golds, predictions)}


class MultiLabelTask(ChoiceTask):
    """Multi-label classification (HoC): gold = tuple of labels, prediction = multi-hot over `choices`."""

    metrics = ("macro_f1",)

    def hosted_gold(self, row: Row) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """A hosted row: `gold` is multi-hot over `choices` (Me-LLaMA's HoC) or a list of indices into them."""
        choices = hosted_choices(row)
        gold = row.get("gold", list)
        if not all(isinstance(g, int) and not isinstance(g, bool) for g in gold):
            raise row.error("gold", "must be a list of integers")
        if len(gold) == len(choices) and set(gold) <= {0, 1}:
            return tuple(c for c, hot in zip(choices, gold, strict=True) if hot), choices
        if all(0 <= g < len(choices) for g in gold):
            return tuple(choices[g] for g in sorted(set(gold))), choices
        raise row.error("gold", f"must be multi-hot over the {len(choices)} choices or indices into them")

    def parse(self, output: str, example: Example) -> list[int]:
        """Multi-hot from per-label substring presence."""
        return parsers.multi_hot(output, example.choices)

    def parse_strict(self, output: str, example: Example) -> list[int]:
        """Multi-hot of the list items that are exactly labels."""
        return parsers.strict_multi_hot(output, example.choices)

    def score(self, examples: list[Example], predictions: list) -> dict[str, Any]:
        """sklearn macro-F1 over the label columns."""
        self.check_lengths(examples, predictions)
        golds = [[int(c in e.gold) for c in e.choices] for e in examples]
        return {"macro_f1": metrics.multilabel_macro_f1(golds, predictions)}


class SpanTask(Task):
    """Extractive QA (EmrQA): the prediction is the answer text; EM and token F1 after normalisation."""

    metrics = ("exact_match", "f1")

    def parse(self, output: str, example: Example) -> str:
        """The whole output (the paper compares all of it, normalised, with the gold span)."""
        return output.strip()

    def parse_strict(self, output: str, example: Example) -> str:
        """The first line of the answer after an optional cue."""
        return parsers.first_line(output)

    def score(self, examples: list[Example], predictions: list) -> dict[str, Any]:
        """Exact match and mean token F1 (lower-cased, punctuation stripped)."""
        self.check_lengths(examples, predictions)
        golds = [e.gold for e in examples]
        return {"exact_match": metrics.exact_match(golds, predictions), "f1": metrics.mean_token_f1(golds, predictions)}


class NERTask(Task):
    """NER as markup (i2b2): gold = the input marked up with `<span class="type">`; prediction = BIO tags over
    the input's tokens; seqeval entity F1."""

    metrics = ("entity_f1",)

    def parse(self, output: str, example: Example) -> list[str]:
        """BIO tags over the input's tokens from the spans the output marks."""
        return parsers.bio_tags(parsers.markup_tags(example.gold)[0], output)

    def parse_strict(self, output: str, example: Example) -> list[str]:
        """BIO tags only when the answer reproduces the input's tokens, else all "O"."""
        return parsers.strict_bio_tags(parsers.markup_tags(example.gold)[0], output)

    def score(self, examples: list[Example], predictions: list) -> dict[str, Any]:
        """seqeval entity F1 against the gold markup's tags."""
        self.check_lengths(examples, predictions)
        return {"entity_f1": metrics.entity_f1([parsers.markup_tags(e.gold)[1] for e in examples], predictions)}


class SummaryTask(Task):
    """Summarization: the prediction is the text; ROUGE-L F and BERTScore F1 (skipped when unavailable)."""

    metrics = ("rouge_l", "bertscore_f1")

    def parse(self, output: str, example: Example) -> str:
        """The output itself."""
        return output.strip()

    def parse_strict(self, output: str, example: Example) -> str:
        """The output without a leading "Summary:"-style cue."""
        return parsers.answer_start(output).strip()

    def score(self, examples: list[Example], predictions: list) -> dict[str, Any]:
        """ROUGE-L F (no stemming); BERTScore F1, or None with a `skipped` reason."""
        self.check_lengths(examples, predictions)
        references = [e.gold for e in examples]
        bert, reason = metrics.bertscore_f1(references, predictions)
        scores: dict[str, Any] = {"rouge_l": metrics.rouge_l(references, predictions), "bertscore_f1": bert}
        if reason is not None:
            scores["skipped"] = {"bertscore_f1": reason}
        return scores
