"""The MIBE metrics, computed by the field's own libraries (DESIGN §2).

scikit-learn for accuracy and macro-F1 (`labels=` the gold label set, so a "missing" prediction only ever counts
wrong), seqeval for entity F1, rouge-score for ROUGE-L F (no stemming), SQuAD-style EM / token F1 for EmrQA, and
BERTScore F1 with bert-base-multilingual-cased when the `bert_score` package and that model are already on this
machine — it is never downloaded; otherwise the metric is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence

import numpy as np

from mellama_jax.evaluation import parsers

BERTSCORE_MODEL = "bert-base-multilingual-cased"  # what Me-LLaMA's harness passes as model_type


def accuracy(golds: Sequence[str], predictions: Sequence[str]) -> float:
    """Fraction of exact label matches (sklearn `accuracy_score`)."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(list(golds), list(predictions)))


def macro_f1(golds: Sequence[str], predictions: Sequence[str]) -> float:
    """sklearn macro-F1 over the gold label set; a label never predicted has F1 0 (sklearn's zero_division default)."""
    from sklearn.metrics import f1_score

    labels = sorted(set(golds))
    return float(f1_score(list(golds), list(predictions), average="macro", labels=labels, zero_division=0.0))


def multilabel_macro_f1(golds: Sequence[Sequence[int]], predictions: Sequence[Sequence[int]]) -> float:
    """HoC: sklearn macro-F1 over the label columns of multi-hot rows (a column with no gold and no predicted
    positive scores 0, sklearn's zero_division default, as in Me-LLaMA's harness)."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(golds), np.asarray(predictions), average="macro", zero_division=0.0))


def entity_f1(golds: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> float:
    """seqeval entity-level F1 (its default: micro over entities, IOB2, lenient mode), as Me-LLaMA computes it."""
    from seqeval.metrics import f1_score

    return float(f1_score([list(g) for g in golds], [list(p) for p in predictions]))


def rouge_l(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, no stemming) over the pairs."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = zip(references, predictions, strict=True)
    return float(np.mean([scorer.score(ref, pred)["rougeL"].fmeasure for ref, pred in pairs]))


def exact_match(golds: Sequence[str], predictions: Sequence[str]) -> float:
    """Fraction of predictions equal to the gold after EmrQA normalisation."""
    same = [parsers.normalize_answer(p) == parsers.normalize_answer(g) for g, p in zip(golds, predictions, strict=True)]
    return float(np.mean(same))


def mean_token_f1(golds: Sequence[str], predictions: Sequence[str]) -> float:
    """Mean SQuAD token F1 after EmrQA normalisation."""
    return float(np.mean([parsers.token_f1(p, g) for g, p in zip(golds, predictions, strict=True)]))


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode while inside: a cached model loads without any request to the Hub."""
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


def bertscore_unavailable(model: str = BERTSCORE_MODEL) -> str | None:
    """Why BERTScore cannot run offline here (no package, model not cached), or None when it can."""
    if importlib.util.find_spec("bert_score") is None:
        return "the bert_score package is not installed (pip install bert-score)"
    from huggingface_hub import try_to_load_from_cache

    weights = ("model.safetensors", "pytorch_model.bin")
    cached = [isinstance(try_to_load_from_cache(model, f), str) for f in ("config.json", "vocab.txt", *weights)]
    if not (cached[0] and cached[1] and any(cached[2:])):
        return f"{model} is not in the local Hugging Face cache (it is never downloaded)"
    return None


def bertscore_f1(references: Sequence[str], predictions: Sequence[str]) -> tuple[float | None, str | None]:
    """Mean BERTScore F1 with bert-base-multilingual-cased (bert_score's default layer, no idf, no rescaling),
    as (value, None), or (None, reason) when it cannot be computed offline."""
    reason = bertscore_unavailable()
    if reason is not None:
        return None, reason
    import bert_score

    with hub_offline():
        _, _, f1 = bert_score.score(list(predictions), list(references), model_type=BERTSCORE_MODEL, verbose=False)
    return float(f1.mean()), None
