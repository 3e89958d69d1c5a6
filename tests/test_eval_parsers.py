"""The paper-compatible and strict parsers on hand-written model outputs, quirks included."""

import json

import pytest

from mellama_jax.evaluation import parsers
from mellama_jax.evaluation.tasks import TASKS, Example

YES_NO_MAYBE = ("yes", "no", "maybe")
LETTERS = ("A", "B", "C", "D", "E")
DDI = TASKS["ddi"].choices
HALLMARKS = TASKS["hoc"].choices


def _example(task: str, gold, choices=()) -> Example:
    return Example("x", "prompt", gold, "text", choices)


@pytest.mark.parametrize(
    ("output", "paper", "strict"),
    [
        ("yes", "yes", "yes"),
        ("  Yes.", "yes", "yes"),
        ("Answer: no", "no", "no"),
        ("The answer is maybe", "maybe", "maybe"),
        # "no" inside "not": the paper parser reads a "no"; the strict one sees no label first
        ("It is not clear from the abstract.", "no", "missing"),
        # choice order decides ties: "yes" comes before "maybe"
        ("maybe yes", "yes", "maybe"),
        ("Perhaps.", "missing", "missing"),
        ("nope", "no", "missing"),
    ],
)
def test_pubmedqa(output, paper, strict):
    example = _example("pubmedqa", "yes", YES_NO_MAYBE)
    assert TASKS["pubmedqa"].parse(output, example) == paper
    assert TASKS["pubmedqa"].parse_strict(output, example) == strict


@pytest.mark.parametrize(
    ("output", "paper", "strict"),
    [
        ("C", "C", "C"),
        ("C. Tell the attending", "C", "C"),
        ("(C)", "C", "C"),
        ("C) text", "C", "C"),
        # "A" inside "Answer": the paper parser takes A; the strict parser reads the cue, then C
        ("Answer: C", "A", "C"),
        ("The answer is C.", "C", "C"),
        ("final answer: E\nBecause ...", "B", "E"),  # the "B" of "Because"
        # case is kept: lower-case letters are no answer for either parser
        ("c", "missing", "missing"),
        # prose starting with the article "A" is no letter answer
        ("A patient with C", "A", "missing"),
        ("B is correct", "B", "missing"),
    ],
)
def test_medqa_letters(output, paper, strict):
    example = _example("medqa", "C", LETTERS)
    assert TASKS["medqa"].parse(output, example) == paper
    assert TASKS["medqa"].parse_strict(output, example) == strict


def test_ddi_exactly_one_label():
    task, example = TASKS["ddi"], _example("ddi", "DDI-effect", DDI)
    assert task.parse("DDI-effect", example) == "DDI-effect"
    assert task.parse("The relation is DDI-mechanism.", example) == "DDI-mechanism"
    assert task.parse("DDI-effect or DDI-advise", example) == "missing"  # two labels
    assert task.parse("no interaction", example) == "missing"
    assert task.parse("ddi-effect", example) == "missing"  # Me-LLaMA's DDI parser is case-sensitive
    assert task.parse_strict("Relation: DDI-int", example) == "DDI-int"
    assert task.parse_strict("ddi-false", example) == "DDI-false"
    assert task.parse_strict("I think DDI-int", example) == "missing"


def test_hoc_multi_label():
    task, example = TASKS["hoc"], _example("hoc", ("inducing angiogenesis",), HALLMARKS)
    output = "resisting cell death; inducing angiogenesis"
    assert task.parse(output, example) == [0, 0, 1, 0, 1, 0, 0, 0, 0, 0]
    assert task.parse_strict(output, example) == [0, 0, 1, 0, 1, 0, 0, 0, 0, 0]
    # substring presence anywhere, even in a sentence; strict needs the list items to be exactly labels
    prose = "The abstract is about tumor promoting inflammation and cellular energetics."
    assert task.parse(prose, example) == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    assert task.parse_strict(prose, example) == [0] * 10
    assert task.parse_strict("Hallmarks: Cellular energetics,\n- avoiding immune destruction", example) == [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1,
    ]  # fmt: skip
    assert task.parse("Resisting Cell Death", example) == [0] * 10  # case-sensitive, as Me-LLaMA's HoC


def test_mtsample_and_nli_lower_case():
    specialties = ("Neurology", "Neurosurgery", "Surgery")
    example = _example("mtsample", "Surgery", specialties)
    assert TASKS["mtsample"].parse("This is a NEUROSURGERY note", example) == "Neurosurgery"
    assert TASKS["mtsample"].parse_strict("Specialty: Surgery", example) == "Surgery"
    # the longest label the answer starts with, not a shorter prefix of it
    assert parsers.strict_label("Neurosurgery", ("Neuro", "Neurosurgery")) == "Neurosurgery"
    nli = _example("mednli", "neutral", TASKS["mednli"].choices)
    assert TASKS["mednli"].parse("Contradiction, not entailment", nli) == "entailment"  # choice order
    assert TASKS["mednli"].parse_strict("Contradiction, not entailment", nli) == "contradiction"


def test_emrqa_normalisation_and_token_f1():
    assert parsers.normalize_answer("  The 10-mg DOSE, daily. ") == "the 10mg dose daily"
    assert parsers.token_f1("10 mg daily.", "10 mg daily") == 1.0
    # common tokens "10", "mg": precision 2/3, recall 2/3 -> F1 2/3
    assert parsers.token_f1("lisinopril 10 mg", "10 mg daily") == pytest.approx(2 / 3, abs=1e-12)
    # repeated tokens count once per gold occurrence (SQuAD's Counter): "mg mg" vs "mg": p 1/2, r 1 -> 2/3
    assert parsers.token_f1("mg mg", "mg") == pytest.approx(2 / 3, abs=1e-12)
    assert parsers.token_f1("", "") == 1.0 and parsers.token_f1("x", "") == 0.0
    task, example = TASKS["emrqa"], _example("emrqa", "10 mg daily")
    assert task.parse("  10 mg daily\nThe dose was given.", example) == "10 mg daily\nThe dose was given."
    assert task.parse_strict('Answer: "10 mg daily"\nThe dose was given.', example) == "10 mg daily"


GOLD = 'Given <span class="treatment">aspirin</span> for <span class="problem">chest pain</span>, no ECG .'


def test_markup_tags():
    tokens, tags = parsers.markup_tags(GOLD)
    assert tokens == ["Given", "aspirin", "for", "chest", "pain", ",", "no", "ECG", "."]
    assert tags == ["O", "B-treatment", "O", "B-problem", "I-problem", "O", "O", "O", "O"]
    assert parsers.tokenize("chest pain, no ECG.") == ["chest", "pain", ",", "no", "ECG", "."]


def test_ner_bio_tags():
    task, example = TASKS["i2b2"], _example("i2b2", GOLD)
    # entities found in the input's tokens even when the model rewrites the rest; unknown classes are text
    output = 'He got <span class="treatment">aspirin</span> (for <span class="problem">chest pain</span>) and '
    output += '<span class="test">ECG</span>; <span class="symptom">Given</span>'
    assert task.parse(output, example) == ["O", "B-treatment", "O", "B-problem", "I-problem", "O", "O", "B-test", "O"]
    # an entity that is not in the input is ignored; a repeated entity tags the next free occurrence
    assert parsers.bio_tags(["pain", "and", "pain"], '<span class="problem">pain</span> <span class="problem">pain'
                            '</span> <span class="drug">x</span>') == ["B-problem", "O", "B-problem"]  # fmt: skip
    assert task.parse("Given aspirin for chest pain, no ECG.", example) == ["O"] * 9
    # strict: the answer must reproduce the input's tokens
    assert task.parse_strict(f"Output: {GOLD}\nmore", example) == parsers.markup_tags(GOLD)[1]
    assert task.parse_strict(output, example) == ["O"] * 9


def test_summary_parsers():
    task, example = TASKS["mimic_cxr"], _example("mimic_cxr", "No acute process.")
    assert task.parse("  No acute process. \n", example) == "No acute process."
    assert task.parse_strict("Impression: No acute process.", example) == "No acute process."


def test_predictions_are_json_serialisable():
    outputs = ["yes", "Answer: B", 'x <span class="test">ECG</span>', "text"]
    for task in TASKS.values():
        gold = GOLD if task.name == "i2b2" else ("cellular energetics",) if task.name == "hoc" else "A"
        example = _example(task.name, gold, getattr(task, "choices", ()) or ("A", "B"))
        for output in outputs:
            for parsed in (task.parse(output, example), task.parse_strict(output, example)):
                assert json.loads(json.dumps(parsed)) == parsed, task.name
