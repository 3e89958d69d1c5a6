"""Turning a model's output into a prediction: the paper's parsers and a strict alternative.

The paper-compatible parsers reproduce Me-LLaMA's harness (BIDS-Xu-Lab/Me-LLaMA `src/tasks/vital_measure.py`,
read for behaviour only): a single-label prediction is the first choice, in choice order, that occurs as a
substring of the output, else "missing"; DDI needs exactly one label to occur; HoC is multi-hot from
per-label substring presence. Their quirks are kept on purpose ("A" inside "Answer", "no" inside "not").

The strict parsers accept only an answer that comes first: after leading whitespace/punctuation and one optional
"Answer:"-style cue, the output must start with a label (followed by a non-letter), or for letter tasks with the
letter alone or in the "X." form.
"""

from __future__ import annotations

import re
import string
from collections import Counter

MISSING = "missing"
ENTITY_TYPES = ("problem", "treatment", "test", "drug")  # DESIGN §2's i2b2 markup classes

# not "<": an NER answer starts with its markup
_LEAD = string.whitespace + "\"'`*([{.,;:-#"
# "Answer:", "The answer is", "Final answer -", "Output:", "Relation:" ... : one cue, then the answer.
_CUE = re.compile(
    r"^(?:the\s+)?(?:final\s+|correct\s+)?"
    r"(?:answer|output|label|prediction|relation|category|specialty|hallmarks?|summary|impression)"
    r"\s*(?::|-|\bis\b)\s*",
    re.IGNORECASE,
)
_SPAN = re.compile(r"<span\s+class\s*=\s*[\"']?([\w-]+)[\"']?\s*>(.*?)</span\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def first_choice(output: str, choices: tuple[str, ...], keep_case: bool = False) -> str:
    """The first choice (in choice order) that occurs in the output, else MISSING; lower-cased unless keep_case."""
    text = output.strip() if keep_case else output.strip().lower()
    for choice in choices:
        if (choice if keep_case else choice.lower()) in text:
            return choice
    return MISSING


def exactly_one(output: str, choices: tuple[str, ...]) -> str:
    """DDI: the one choice that occurs in the output; none or several -> MISSING (case-sensitive, as the paper's)."""
    found = [choice for choice in choices if choice in output.strip()]
    return found[0] if len(found) == 1 else MISSING


def multi_hot(output: str, choices: tuple[str, ...]) -> list[int]:
    """HoC: 1 for each choice that occurs in the output (case-sensitive, as the paper's), else 0."""
    text = output.strip()
    return [int(choice in text) for choice in choices]


def answer_start(output: str) -> str:
    """The output without leading whitespace/punctuation and one leading "Answer:"-style cue."""
    return _CUE.sub("", output.lstrip(_LEAD), count=1).lstrip(_LEAD)


def strict_label(output: str, choices: tuple[str, ...]) -> str:
    """The label the answer starts with (case-insensitive, longest match, then a non-letter), else MISSING."""
    text = answer_start(output).lower()
    best = MISSING
    for choice in choices:
        label = choice.lower()
        follows = text[len(label) : len(label) + 1]
        if text.startswith(label) and not follows.isalnum() and (best == MISSING or len(choice) > len(best)):
            best = choice
    return best


def strict_letter(output: str, choices: tuple[str, ...]) -> str:
    """The option letter the answer starts with, alone or as "X." / "X)" / "X:" (case kept), else MISSING."""
    text = answer_start(output)
    letters = "|".join(re.escape(c) for c in choices)
    match = re.match(rf"({letters})(?:[.):,;]|\s*$|\s*\n)", text)
    return match.group(1) if match else MISSING


def strict_multi_hot(output: str, choices: tuple[str, ...]) -> list[int]:
    """HoC strict: the answer is a `;`/`,`/newline-separated list; each item must be exactly a label."""
    items = {item.strip(_LEAD).lower() for item in re.split(r"[;,\n]", answer_start(output))}
    return [int(choice.lower() in items) for choice in choices]


def first_line(output: str) -> str:
    """The first non-empty line of the answer (after a cue), without surrounding quotes."""
    lines = [line for line in answer_start(output).splitlines() if line.strip()]
    return lines[0].strip().strip("\"'`") if lines else ""


# EmrQA (DESIGN §2): lower-case, strip punctuation, EM and token F1 as in SQuAD's evaluation script.


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between normalized strings (both empty -> 1, one empty -> 0)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# NER: `<span class="type">...</span>` markup -> entities -> BIO tags over the input's tokens (for seqeval).


def tokenize(text: str) -> list[str]:
    """Words and single punctuation marks, so "pain," and "<span>pain</span>," give the same tokens."""
    return _TOKEN.findall(text)


def markup_tags(markup: str) -> tuple[list[str], list[str]]:
    """The tokens of a marked-up text and their BIO tags; spans of unknown classes are plain text."""
    tokens: list[str] = []
    tags: list[str] = []
    position = 0
    for match in _SPAN.finditer(markup):
        outside = tokenize(_TAG.sub(" ", markup[position : match.start()]))
        tokens += outside
        tags += ["O"] * len(outside)
        kind, inside = match.group(1).lower(), tokenize(_TAG.sub(" ", match.group(2)))
        tokens += inside
        if kind in ENTITY_TYPES:
            tags += [f"{'B' if i == 0 else 'I'}-{kind}" for i in range(len(inside))]
        else:
            tags += ["O"] * len(inside)
        position = match.end()
    rest = tokenize(_TAG.sub(" ", markup[position:]))
    return tokens + rest, tags + ["O"] * len(rest)


def entities(markup: str) -> list[tuple[str, tuple[str, ...]]]:
    """The (type, tokens) of each known-class span, in order."""
    found = []
    for match in _SPAN.finditer(markup):
        kind, inside = match.group(1).lower(), tuple(tokenize(_TAG.sub(" ", match.group(2))))
        if kind in ENTITY_TYPES and inside:
            found.append((kind, inside))
    return found


def _free_run(tokens: list[str], tags: list[str], entity: tuple[str, ...], start: int) -> int | None:
    for i in range(start, len(tokens) - len(entity) + 1):
        if tuple(tokens[i : i + len(entity)]) == entity and all(t == "O" for t in tags[i : i + len(entity)]):
            return i
    return None


def bio_tags(reference: list[str], output: str) -> list[str]:
    """Paper-compatible NER: each predicted entity tags its next untagged occurrence in the reference tokens.

    Entities are matched in order from where the previous one ended (then from the start), so a model that
    drops, adds or rewrites surrounding words still scores the entities it marked; unmatched entities are
    ignored, like Me-LLaMA's alignment of the predicted and gold token sequences.
    """
    tags = ["O"] * len(reference)
    cursor = 0
    for kind, entity in entities(output):
        start = _free_run(reference, tags, entity, cursor)
        if start is None:
            start = _free_run(reference, tags, entity, 0)
        if start is None:
            continue
        tags[start : start + len(entity)] = [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        cursor = start + len(entity)
    return tags


def strict_bio_tags(reference: list[str], output: str) -> list[str]:
    """Strict NER: the answer's text must reproduce the input's tokens exactly; its tags are then taken as is."""
    tokens, tags = markup_tags(first_line(output))
    return tags if tokens == reference else ["O"] * len(reference)
