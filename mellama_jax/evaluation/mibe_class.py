"""MIBE classification: DDI-2013 (relation extraction), HoC (multi-label), MTSample, BioNLI, MedNLI.

Prompt wording: DDI follows Biomedical-NLP-Benchmarks (BIDS-Xu-Lab) `benchmarks/[RE]DDI/prompt_zeroshot.txt`.
HoC keeps the task and documentation of `benchmarks/[MLC]Hoc/prompt_zeroshot.txt` but asks for the related
hallmarks separated by "; " (DESIGN §2's output form) instead of a JSON object of 0/1 values, since a JSON answer
names every hallmark and the paper's substring parser would mark all ten. MTSample, BioNLI and MedNLI wordings
were not found: ours are faithful equivalents in the same TASK / INPUT / OUTPUT layout.
"""

from __future__ import annotations

import pathlib

from mellama_jax.errors import UserError
from mellama_jax.evaluation import parsers
from mellama_jax.evaluation.base import Example, Row
from mellama_jax.evaluation.kinds import ChoiceTask, MultiLabelTask

_DDI = (
    "TASK: the task is to classify relations between two drugs for a sentence.\n\n"
    "INPUT: the input is a sentence where the drugs are labeled as @DRUG$.\n\n"
    "OUTPUT: your task is to select one out of the five types of relations ('DDI-effect', 'DDI-mechanism', "
    "'DDI-advise', 'DDI-false', and 'DDI-int') for the drugs without any explanation or other characters:\n"
    "DDI-mechanism: This type is used to annotate DDIs that are described by their PK mechanism "
    "(e.g. Grepafloxacin may inhibit the metabolism of theobromine)\n"
    "DDI-effect: This type is used to annotate DDIs describing an effect (e.g. In uninfected volunteers, 46% "
    "developed rash while receiving SUSTIVA and clarithromycin) or a PD mechanism (e.g. Chlorthalidone may "
    "potentiate the action of other antihypertensive drugs)\n"
    "DDI-advise: This type is used when a recommendation or advice regarding a drug interaction is given "
    "(e.g. UROXATRAL should not be used in combination with other alpha-blockers)\n"
    "DDI-int: This type is used when a DDI appears in the text without providing any additional information "
    "(e.g. The interaction of omeprazole and ketoconazole has been established)\n"
    "DDI-false, This type is used when no DDI relation appears\n\n"
    "Input: {input}\nOutput:"
)
# Me-LLaMA's HoC.CHOICES order (what its parser scans); the documentation lists them in the prompt file's order.
_HALLMARKS = (
    "sustaining proliferative signaling",
    "evading growth suppressors",
    "resisting cell death",
    "enabling replicative immortality",
    "inducing angiogenesis",
    "activating invasion and metastasis",
    "genomic instability and mutation",
    "tumor promoting inflammation",
    "cellular energetics",
    "avoiding immune destruction",
)
_HOC_DOC_ORDER = (5, 0, 2, 8, 6, 1, 4, 3, 9, 7)
_HOC = (
    "***TASK***\nThe task is to perform a semantic classification of the article according to the hallmarks of "
    "cancer based on its abstract.\n\n***INPUT***\nThe input is an abstract text.\n\n***DOCUMENTATION***\n"
    "There are 10 cancer hallmarks you will need to decide whether the article is related to, including:\n"
    + "\n".join(_HALLMARKS[i] for i in _HOC_DOC_ORDER)
    + '\n\n***OUTPUT***\nThe output should be the hallmarks the article is related to, separated by "; ".\n'
    "Please note one article can be related to multiple classes.\n\nInput: {input}\nOutput:"
)
_MTSAMPLE = (
    "TASK: Your task is to classify a medical transcription into the medical specialty it belongs to.\n"
    "INPUT: The input is a medical transcription.\n"
    "OUTPUT: Answer with one of the following specialties: {specialties}.\n\n"
    "INPUT: {input}\n\nOUTPUT:"
)
_NLI = (
    "TASK: Your task is to decide the relation between a premise and a hypothesis {source}.\n"
    "INPUT: The input is a premise followed by a hypothesis.\n"
    "OUTPUT: Answer with one of the following options: {labels}.\n\n"
    "INPUT: {input}\n\nOUTPUT:"
)


class DDI(ChoiceTask):
    """DDI-2013 test: the relation between two masked drugs (@DRUG$); exactly one label must occur."""

    name, title = "ddi", "DDI-2013"
    paper = {"macro_f1": 0.283}
    patterns = ("ddi*.json*", "ddi*.csv", "ddi*.tsv")
    choices = ("DDI-effect", "DDI-mechanism", "DDI-advise", "DDI-false", "DDI-int")

    def from_original(self, row: Row) -> Example:
        """Fields: `index` (pair id; else `row`), `sentence`, `label`."""
        example_id = next((str(row.data[k]) for k in ("index", "row") if row.data.get(k) is not None), str(row.index))
        sentence = row.get("sentence")
        gold = self.label(row, "label", row.get("label"))
        return Example(example_id, _DDI.format(input=sentence), gold, sentence, self.choices)

    def parse(self, output: str, example: Example) -> str:
        """The one label occurring in the output; none or several -> "missing" (Me-LLaMA's DDI2013)."""
        return parsers.exactly_one(output, example.choices)


class HoC(MultiLabelTask):
    """Hallmarks of Cancer test (315 abstracts): any of the 10 hallmarks; macro-F1 over the 10 labels."""

    name, title = "hoc", "HoC"
    paper = {"macro_f1": 0.544}
    patterns = ("hoc*.json*",)
    choices = _HALLMARKS

    def from_original(self, row: Row) -> Example:
        """Fields: `pmid`, `text` (pre-tokenized abstract), `labels` (hallmark names; may be empty)."""
        labels = row.get("labels", list)
        for label in labels:
            self.label(row, "labels", label)
        text = row.get("text")
        gold = tuple(c for c in self.choices if c in labels)
        return Example(str(row.get("pmid", (str, int))), _HOC.format(input=text), gold, text, self.choices)


class MTSample(ChoiceTask):
    """MTSamples: the medical specialty of a transcription (40 specialties).

    In the original CSV the label set is the file's specialties, sorted: that is the choice order.
    """

    name, title = "mtsample", "MTSample"
    patterns = ("mtsample*.csv", "mtsample*.json*")

    def from_original(self, row: Row) -> Example | None:
        """mtsamples.csv columns: (index), description, medical_specialty, sample_name, transcription, keywords.

        Rows without a transcription (the public file has a few) are skipped: there is nothing to classify.
        """
        specialty = row.get("medical_specialty").strip()
        if "transcription" not in row.data:
            raise UserError(f"{row.where}: missing field 'transcription'")
        transcription = row.data["transcription"]
        if transcription is None or not transcription.strip():
            return None
        example_id = row.data.get("") or str(row.index)  # the CSV's unnamed first column
        return Example(str(example_id), "", specialty, transcription.strip())

    def load(self, data_dir: pathlib.Path, limit: int | None = None) -> list[Example]:
        """All rows first: the prompt lists every specialty of the file, which only the whole file knows."""
        examples = super().load(data_dir)
        specialties = tuple(sorted({e.gold for e in examples if not e.choices}))
        examples = [e if e.choices else self._prompted(e, specialties) for e in examples]
        return examples[:limit]

    @staticmethod
    def _prompted(example: Example, specialties: tuple[str, ...]) -> Example:
        prompt = _MTSAMPLE.format(specialties=", ".join(specialties), input=example.text)
        return Example(example.id, prompt, example.gold, example.text, specialties)


class BioNLI(ChoiceTask):
    """BioNLI test: does the conclusion follow from the abstract's supporting text (entailment / contradiction)."""

    name, title = "bionli", "BioNLI"
    patterns = ("bionli*.json*", "bionli*.csv")
    choices = ("entailment", "contradiction")

    def from_original(self, row: Row) -> Example:
        """BioNLI fields (StonyBrookNLP/BioNLI `src/data_preparation.py`): `supp_set` (or `premise`), `conclusion`
        (or `hypothesis`), `label_cat`: "pos" = the original conclusion (entailment), any other category names
        the perturbation that made it inconsistent (contradiction)."""
        premise = row.first(("premise", "supp_set"))
        hypothesis = row.first(("hypothesis", "conclusion"))
        category = row.first(("label_cat", "label"))
        gold = category if category in self.choices else ("entailment" if category == "pos" else "contradiction")
        text = f"Premise: {premise}\nHypothesis: {hypothesis}"
        prompt = _NLI.format(
            source="(the supporting text of a biomedical abstract and a conclusion)",
            labels=", ".join(self.choices),
            input=text,
        )
        example_id = next((str(row.data[k]) for k in ("index", "id") if row.data.get(k) is not None), str(row.index))
        return Example(example_id, prompt, gold, text, self.choices)


class MedNLI(ChoiceTask):
    """MedNLI test: entailment / contradiction / neutral between two sentences of clinical notes."""

    name, title = "mednli", "MedNLI"
    paper = {"macro_f1": 0.675}
    patterns = ("mednli*.json*", "mli_test*.json*")
    choices = ("entailment", "contradiction", "neutral")

    def from_original(self, row: Row) -> Example:
        """MedNLI (SNLI-style) fields: `pairID`, `sentence1` (premise), `sentence2` (hypothesis), `gold_label`."""
        text = f"Premise: {row.get('sentence1')}\nHypothesis: {row.get('sentence2')}"
        gold = self.label(row, "gold_label", row.get("gold_label"))
        prompt = _NLI.format(source="(two sentences from clinical notes)", labels=", ".join(self.choices), input=text)
        return Example(str(row.get("pairID") if "pairID" in row.data else row.index), prompt, gold, text, self.choices)
