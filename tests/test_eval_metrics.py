"""Each task's score against its reference library called directly on the same inputs (sklearn, seqeval,
rouge-score; EM/F1 by hand), and BERTScore's skip reason. Tolerance: 1e-12 (same library, same inputs)."""

import importlib.util
import json

import huggingface_hub
import numpy as np
import pytest
from rouge_score import rouge_scorer
from seqeval.metrics import f1_score as seqeval_f1
from sklearn.metrics import accuracy_score, f1_score

from mellama_jax.evaluation import metrics
from mellama_jax.evaluation.tasks import TASKS, Example

TOL = 1e-12


def _examples(golds, choices=()) -> list[Example]:
    return [Example(str(i), "prompt", g, "text", choices) for i, g in enumerate(golds)]


def test_classification_matches_sklearn_after_a_jsonl_round_trip():
    task = TASKS["pubmedqa"]
    golds = ["yes", "no", "maybe", "yes", "yes", "no"]
    outputs = ["Yes.", "It is not known", "Perhaps", "no", "maybe yes", "NO"]
    examples = _examples(golds, ("yes", "no", "maybe"))
    parsed = [task.parse(o, e) for o, e in zip(outputs, examples, strict=True)]
    assert parsed == ["yes", "no", "missing", "no", "yes", "no"]
    # what predictions/<task>.jsonl would hold, read back
    rows = [
        json.loads(json.dumps({"id": e.id, "gold": e.gold, "parsed": p})) for e, p in zip(examples, parsed, strict=True)
    ]
    y_true, y_pred = [r["gold"] for r in rows], [r["parsed"] for r in rows]
    scores = task.score(examples, y_pred)
    assert list(scores) == list(task.metrics) == ["accuracy", "macro_f1"]
    assert scores["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=TOL)
    reference = f1_score(y_true, y_pred, average="macro", labels=sorted(set(y_true)))
    assert scores["macro_f1"] == pytest.approx(reference, abs=TOL)
    # by hand: yes P 1 R 2/3 F 0.8; no P 2/3 R 1 F 0.8; maybe P 0 (never predicted) F 0; "missing" only counts wrong
    assert scores["macro_f1"] == pytest.approx((0.8 + 0.8 + 0.0) / 3, abs=TOL)
    assert scores["accuracy"] == pytest.approx(4 / 6, abs=TOL)


def test_ddi_macro_f1_over_gold_labels_only():
    task = TASKS["ddi"]
    golds = ["DDI-false", "DDI-false", "DDI-effect", "DDI-mechanism"]
    predictions = ["DDI-false", "DDI-advise", "missing", "DDI-mechanism"]  # DDI-advise is not a gold label
    scores = task.score(_examples(golds, task.choices), predictions)
    reference = f1_score(golds, predictions, average="macro", labels=sorted(set(golds)))
    assert scores["macro_f1"] == pytest.approx(reference, abs=TOL)


def test_hoc_macro_f1_matches_sklearn_multilabel():
    task = TASKS["hoc"]
    choices = task.choices
    golds = [(choices[0], choices[2]), (choices[2],), (choices[9],), ()]
    predictions = [
        [1, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
    ]
    y_true = np.array([[int(c in g) for c in choices] for g in golds])
    scores = task.score(_examples(golds, choices), predictions)
    assert list(scores) == ["macro_f1"]
    reference = f1_score(y_true, np.array(predictions), average="macro", zero_division=0)
    assert scores["macro_f1"] == pytest.approx(reference, abs=TOL)
    # by hand: column 0 F 2/3, column 2 F 2/3, column 9 F 1, column 4 F 0, six empty columns F 0
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 10, abs=TOL)


def test_ner_entity_f1_matches_seqeval():
    task = TASKS["i2b2"]
    golds = [
        '<span class="problem">chest pain</span> after <span class="treatment">aspirin</span>',
        'no <span class="test">ECG</span> done',
    ]
    predictions = [["B-problem", "I-problem", "O", "B-problem"], ["O", "B-test", "O"]]
    gold_tags = [["B-problem", "I-problem", "O", "B-treatment"], ["O", "B-test", "O"]]
    scores = task.score(_examples(golds), predictions)
    assert scores["entity_f1"] == pytest.approx(seqeval_f1(gold_tags, predictions), abs=TOL)
    assert scores["entity_f1"] == pytest.approx(2 / 3, abs=TOL)  # 2 of 3 predicted and 2 of 3 gold entities right


def test_emrqa_exact_match_and_f1_by_hand():
    task = TASKS["emrqa"]
    golds = ["10 mg daily", "blood pressure control", "Aspirin"]
    predictions = ["10 mg, daily.", "pressure control of the blood", "metformin"]
    scores = task.score(_examples(golds), predictions)
    assert scores["exact_match"] == pytest.approx(1 / 3, abs=TOL)
    # row 2: common {blood, pressure, control} = 3, precision 3/5, recall 3/3 -> F1 0.75
    assert scores["f1"] == pytest.approx((1.0 + 0.75 + 0.0) / 3, abs=TOL)


def test_rouge_l_matches_rouge_score():
    task = TASKS["pubmed_summ"]
    references = ["vitamin d reduced back pain in adults .", "smoke exposure increases asthma visits ."]
    predictions = ["Vitamin D supplements reduced pain.", "asthma visits rise with smoke exposure"]
    scores = task.score(_examples(references), predictions)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    reference = np.mean([scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(references, predictions, strict=True)])
    assert scores["rouge_l"] == pytest.approx(reference, abs=TOL)
    assert list(scores)[:2] == ["rouge_l", "bertscore_f1"]


@pytest.mark.skipif(importlib.util.find_spec("bert_score") is not None, reason="bert_score is installed here")
def test_bertscore_is_skipped_with_its_reason():
    scores = TASKS["mimic_cxr"].score(_examples(["No acute process."]), ["Normal chest."])
    assert scores["bertscore_f1"] is None
    assert scores["skipped"] == {"bertscore_f1": "the bert_score package is not installed (pip install bert-score)"}


def test_bertscore_needs_the_model_in_the_local_cache(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "bert_score" else real_find_spec(name)
    )
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename: None)
    reason = metrics.bertscore_unavailable()
    assert reason == "bert-base-multilingual-cased is not in the local Hugging Face cache (it is never downloaded)"
    cached = {"config.json", "vocab.txt", "model.safetensors"}
    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda repo, f: f"/cache/{f}" if f in cached else None
    )
    assert metrics.bertscore_unavailable() is None


def test_hub_offline_is_restored():
    before = huggingface_hub.is_offline_mode()
    with metrics.hub_offline():
        assert huggingface_hub.is_offline_mode()
    assert huggingface_hub.is_offline_mode() == before


def test_one_prediction_per_example():
    with pytest.raises(ValueError, match="pubmedqa: 1 predictions for 2 examples"):
        TASKS["pubmedqa"].score(_examples(["yes", "no"], ("yes", "no", "maybe")), ["yes"])
