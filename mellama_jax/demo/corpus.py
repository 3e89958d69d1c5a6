"""The built-in demo corpus: an invented world of checkable facts, rendered as CPT text, SFT records and eval items.

    from mellama_jax.demo.corpus import write_demo_data
    files = write_demo_data(out_dir, seed=0, size=150_000)  # also trains out_dir/tokenizer (byte-level BPE)

The world: invented drugs, each of one drug class and treating one invented disease; each disease affects one organ.
Drug and disease names carry no hint of their facts, so a model can only answer from what it read. A held-out part
of the world (some drugs and diseases) appears in the pre-training text as often as the rest, but its names never
appear in an SFT record: its facts are asked only by the eval files, so instruction tuning has to draw on what
continued pre-training taught.

Written (all JSON lines, everything generated here from `seed`, no downloads):
- cpt/biomedical.jsonl, cpt/clinical.jsonl, cpt/general.jsonl (field `text`): abstract-like, note-like and general
  documents (general ones state no fact), mixed 15:1:4 by tokens of the demo tokenizer (or of a given one);
- tokenizer/: tokenizer.json + tokenizer_config.json (<s>, </s>, <unk>), unless a tokenizer is given;
- sft/train.jsonl: Me-LLaMA records `{"id", "conversations": [human, agent]}` on the training facts;
- eval/demo_mc.jsonl, eval/demo_yesno.jsonl, eval/demo_short.jsonl: the held-out facts in the hosted-eval schema
  `{id, query, answer, choices, gold}` (evaluation/demo_tasks.py reads them).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Iterator

import numpy as np

from mellama_jax.data.tokenizer import load_tokenizer
from mellama_jax.errors import UserError
from mellama_jax.evaluation.demo_tasks import ANSWER_CUE

MIXTURE = {"biomedical": 15, "clinical": 1, "general": 4}  # shares of the CPT tokens, Me-LLaMA's 15:1:4
SPECIALS = ("<unk>", "<s>", "</s>")
VOCAB_SIZE = 1024  # the demo tokenizer's, and the demo model's

CLASSES = ("beta blocker", "statin", "kinase inhibitor", "antibiotic", "anticoagulant", "antiviral")
ORGANS = ("heart", "liver", "kidney", "lung", "brain", "skin", "pancreas", "stomach")
DRUGS = (
    "zorvatel", "quenamide", "lirapex", "dovanol", "mestriline", "kavudin", "telbomax", "parizone", "fendrocet",
    "ulvasine", "noritrex", "brovalin", "gemtacor", "sarpidol", "vexomab", "hilucast", "ombrefen", "trazinor",
    "calvudex", "pentromil", "rixadone", "solvatrin", "ambricor", "jelmoxan", "doravist", "kestrazol", "migrenol",
    "fluvorat", "nebalin", "cortamide", "ziprelax", "onvutide", "halcepro", "wembrazin", "tolmecid", "glavorine",
    "sevatrol", "icordan", "plumexin", "yaroctin",
)  # fmt: skip
DISEASES = (
    "Marlow disease", "Ketter syndrome", "Ossian fever", "Norbury palsy", "Velloran anemia", "Tressa syndrome",
    "Quillan disease", "Harrow fever", "Eldmore syndrome", "Kaskel disease", "Rennick palsy", "Soller fever",
    "Imwell syndrome", "Fenwick disease", "Gorran anemia", "Lisbet syndrome", "Pelham disease", "Yarrow fever",
    "Tamsin palsy", "Sorvey syndrome",
)  # fmt: skip
# No name holds a capital A-D: the paper parser of the MC task takes the first option letter found anywhere in the
# output, and the SFT replies recall the fact (disease names included) before giving the letter.
HELD_OUT_DRUGS, HELD_OUT_DISEASES = 12, 6  # the last drugs and diseases of the seeded order


def count_tokens(text: str) -> int:
    """Words and punctuation marks: how the demo tokenizer's training sample is sized, before a tokenizer exists."""
    return len(re.findall(r"\w+|[^\w\s]", text))


@dataclasses.dataclass(frozen=True)
class World:
    """The facts: drug -> class, drug -> disease, disease -> organ; which drugs and diseases are held out."""

    drug_class: dict[str, str]
    drug_disease: dict[str, str]
    disease_organ: dict[str, str]
    held_out_drugs: tuple[str, ...]
    held_out_diseases: tuple[str, ...]

    def facts(self, held_out: bool) -> list[tuple[str, str, str]]:
        """(relation, subject, object) triples of the held-out or the training part."""
        drugs = [d for d in self.drug_class if (d in self.held_out_drugs) == held_out]
        diseases = [d for d in self.disease_organ if (d in self.held_out_diseases) == held_out]
        return (
            [("class", d, self.drug_class[d]) for d in drugs]
            + [("treats", d, self.drug_disease[d]) for d in drugs]
            + [("organ", d, self.disease_organ[d]) for d in diseases]
        )


def make_world(seed: int = 0) -> World:
    """The seeded world. Training drugs treat training diseases only, so no SFT record names a held-out disease."""
    rng = np.random.default_rng([seed, 1])
    drugs = [DRUGS[i] for i in rng.permutation(len(DRUGS))]
    diseases = [DISEASES[i] for i in rng.permutation(len(DISEASES))]
    held_drugs, held_diseases = drugs[-HELD_OUT_DRUGS:], diseases[-HELD_OUT_DISEASES:]
    train_diseases = diseases[:-HELD_OUT_DISEASES]
    # classes and organs dealt round-robin over a shuffle: every answer is used about equally often
    drug_class = {d: CLASSES[i % len(CLASSES)] for i, d in enumerate(rng.permutation(drugs))}
    disease_organ = {d: ORGANS[i % len(ORGANS)] for i, d in enumerate(rng.permutation(diseases))}
    drug_disease = {}
    for i, d in enumerate(drugs):
        pool = train_diseases if d not in held_drugs else diseases
        drug_disease[d] = pool[i % len(pool)]
    return World(drug_class, drug_disease, disease_organ, tuple(held_drugs), tuple(held_diseases))


# --- CPT documents ---------------------------------------------------------------------------------------------

_CLASS_SENTENCES = (
    "{drug} is {a_cls}.",
    "As {a_cls}, {drug} was well tolerated.",
    "The {cls} {drug} was studied in this cohort.",
    "{drug} belongs to the {cls} class.",
    "Pharmacologically, {drug} acts as {a_cls}.",
)
# The subject comes before the object in every fact sentence: small language models learn "A ... B" as A -> B
# and rarely the reverse, and the questions ask from the subject (drug -> class / disease, disease -> organ).
_TREATS_SENTENCES = (
    "{drug} is used to treat {disease}.",
    "{drug} was given to patients with {disease}.",
    "{drug} is a first-line therapy for {disease}.",
    "{drug} reduced symptoms in {disease}.",
    "{drug} improved outcomes in {disease}.",
)
_ORGAN_SENTENCES = (
    "{disease} is a disease of the {organ}.",
    "{disease} mainly affects the {organ}.",
    "{disease} causes progressive damage to the {organ}.",
    "{disease} is a chronic condition of the {organ}.",
    "{disease} is confirmed by biopsy of the {organ}.",
)
_FILLERS = (
    "We enrolled {n} patients in {k} centres.",
    "The median follow-up was {k} months.",
    "Adverse events were mild in {p} percent of patients.",
    "The primary endpoint was met with p = 0.0{k}.",
    "Larger randomized trials are needed.",
    "Baseline characteristics were similar between groups.",
)
_GENERAL = (
    "The weather in the valley was {adj} on {day}, and the market opened early.",
    "She baked {n} loaves of bread and gave {k} of them to her neighbours.",
    "The team won the match by {k} points after a {adj} second half.",
    "A {adj} train left the station at {k} o'clock on {day}.",
    "The library added {n} new books about gardening and travel.",
    "On {day} the children painted the fence in {adj} colours.",
    "The river rose {k} feet after a {adj} week of rain.",
    "He planted {n} tulips along the garden path.",
)
_ADJ = ("quiet", "sunny", "busy", "cold", "bright", "long", "windy", "calm")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _a(noun: str) -> str:
    """The noun with its indefinite article."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _fill(rng: np.random.Generator, template: str, **facts: str) -> str:
    numbers = {"n": int(rng.integers(20, 900)), "k": int(rng.integers(2, 10)), "p": int(rng.integers(5, 40))}
    return template.format(adj=_pick(rng, _ADJ), day=_pick(rng, _DAYS), **numbers, **facts)


def _drug_sentences(world: World, rng: np.random.Generator, drug: str) -> list[str]:
    """Both facts of a drug and the organ of its disease, in varied wording."""
    disease = world.drug_disease[drug]
    return [
        _fill(
            rng, _pick(rng, _CLASS_SENTENCES), drug=drug, cls=world.drug_class[drug], a_cls=_a(world.drug_class[drug])
        ),
        _fill(rng, _pick(rng, _TREATS_SENTENCES), drug=drug, disease=disease),
        _fill(rng, _pick(rng, _ORGAN_SENTENCES), disease=disease, organ=world.disease_organ[disease]),
    ]


def _abstract(world: World, rng: np.random.Generator, drugs: list[str]) -> str:
    """An abstract-like document about two drugs: background, methods, results, conclusion."""
    first, second = drugs
    facts = _drug_sentences(world, rng, first) + _drug_sentences(world, rng, second)
    order = rng.permutation(len(facts))
    fillers = [_fill(rng, _pick(rng, _FILLERS)) for _ in range(3)]
    body = [facts[i] for i in order[:3]] + fillers[:2] + [facts[i] for i in order[3:]] + fillers[2:]
    conclusion = f"{first} is effective in {world.drug_disease[first]}."
    return (
        f"Background: {body[0]} Methods: {' '.join(body[1:4])} Results: {' '.join(body[4:])} Conclusion: {conclusion}"
    )


def _note(world: World, rng: np.random.Generator, drug: str) -> str:
    """A clinical-note-like document about one patient on one drug."""
    disease = world.drug_disease[drug]
    age, sex = int(rng.integers(25, 90)), _pick(rng, ("man", "woman"))
    return (
        f"Chief complaint: follow-up. History: {age}-year-old {sex} with {disease}, a disease of the "
        f"{world.disease_organ[disease]}. Medications: {drug} {int(rng.integers(1, 20)) * 5} mg daily; "
        f"{drug} is {_a(world.drug_class[drug])}. Assessment: {disease} stable. Plan: continue {drug} for {disease}."
    )


def _general(rng: np.random.Generator) -> str:
    return " ".join(_fill(rng, _pick(rng, _GENERAL)) for _ in range(int(rng.integers(4, 8))))


def document_stream(world: World, domain: str, seed: int = 0) -> Iterator[str]:
    """The endless, seeded documents of one domain; a corpus is a prefix of each domain's stream.

    Drugs are dealt in seeded shuffles (every drug once per round), so each fact, held out or not, is repeated
    about equally often across documents with varied wording.
    """
    rng = np.random.default_rng([seed, 2, list(MIXTURE).index(domain)])
    drugs, deck = list(world.drug_class), []
    while True:
        if domain == "general":
            yield _general(rng)
            continue
        while len(deck) < 2:
            deck.extend(drugs[i] for i in rng.permutation(len(drugs)))
        if domain == "biomedical":
            yield _abstract(world, rng, [deck.pop(0), deck.pop(0)])
        else:
            yield _note(world, rng, deck.pop(0))


def cpt_documents(world: World, size: int, seed: int = 0, count: Callable[[str], int] = count_tokens) -> dict:
    """Domain -> documents: a prefix of each domain's stream that holds its MIXTURE share of `size` tokens, counted
    by `count` (a tokenizer's token count without BOS/EOS)."""
    total, out = sum(MIXTURE.values()), {}
    for domain, share in MIXTURE.items():
        budget, docs, tokens = size * share // total, [], 0
        for doc in document_stream(world, domain, seed):
            if tokens >= budget:
                break
            docs.append(doc)
            tokens += count(doc)
        out[domain] = docs
    return out


# --- SFT records and eval items -------------------------------------------------------------------------------

_QUESTIONS = {  # relation -> (question, yes/no statement)
    "class": ("Which drug class does {s} belong to?", "{s} is {a_o}."),
    "treats": ("Which disease is {s} used to treat?", "{s} is used to treat {o}."),
    "organ": ("Which organ does {s} mainly affect?", "{s} mainly affects the {o}."),
}
MC_PROMPT = "TASK: Answer the medical question with one of the choices.\nINPUT: {question}\nChoices: {options}\nOUTPUT:"
YESNO_PROMPT = "TASK: Is the statement true? State the fact, then answer yes or no.\nINPUT: {statement}\nOUTPUT:"
SHORT_PROMPT = "TASK: Answer the medical question by stating the fact.\nINPUT: {question}\nOUTPUT:"
SFT_VARIANTS = 8  # MC items and yes/no pairs per training fact


def _answers(world: World, relation: str, held_out: bool) -> tuple[str, ...]:
    """The objects a relation can have. Training items draw distractors from training names only."""
    if relation == "class":
        return CLASSES
    if relation == "organ":
        return ORGANS
    return tuple(d for d in DISEASES if held_out or d not in world.held_out_diseases)


def items(world: World, held_out: bool, seed: int = 0, variants: int = 1) -> dict[str, list[dict]]:
    """Kind (mc, yesno, short) -> items {id, query, answer, choices, gold, recall} on the held-out or the training
    facts; `recall` states the true fact in the pre-training text's words with "It" for the subject (SFT replies use
    it, eval files drop it): a reply that had to repeat the name started with a training name for most held-out items
    (a model this small does not learn to copy a name it never answered about), while the fact itself is recalled.

    Each fact gives `variants` MC items (other distractors, the gold at another position) and `variants` true/false
    statement pairs. MC items list four candidate answers and are answered with one of them, not with a letter: a
    model this small did not learn, in minutes of LoRA, to map a recalled answer to its letter (held-out MC stayed at
    chance, 0.17-0.33, over two seeds and six corpus variants), while it does pick the recalled answer among the
    listed ones. Gold positions cycle and yes/no golds alternate, so a constant answer scores chance (1/4, 1/2).
    """
    rng = np.random.default_rng([seed, 3, int(held_out)])
    out: dict[str, list[dict]] = {"mc": [], "yesno": [], "short": []}
    for relation, subject, obj in world.facts(held_out):
        question, statement = _QUESTIONS[relation]
        pool = _answers(world, relation, held_out)
        key = f"{relation}-{subject}".replace(" ", "_")
        q, recall = question.format(s=subject), statement.format(s="It", o=obj, a_o=_a(obj))
        out["short"].append(_item(f"short-{key}", SHORT_PROMPT.format(question=q), pool, pool.index(obj), recall))
        for v in range(variants):
            wrong = [a for a in pool if a != obj]
            distractors = [wrong[i] for i in rng.permutation(len(wrong))[:3]]
            n, tag = len(out["mc"]), f"{key}-{v}" if variants > 1 else key
            options = tuple(distractors[: n % 4] + [obj] + distractors[n % 4 :])
            prompt = MC_PROMPT.format(question=q, options="; ".join(options))
            out["mc"].append(_item(f"mc-{tag}", prompt, options, n % 4, recall))
            for truth in (True, False):
                other = obj if truth else distractors[0]
                claim = YESNO_PROMPT.format(statement=statement.format(s=subject, o=other, a_o=_a(other)))
                out["yesno"].append(_item(f"yesno-{tag}-{truth}".lower(), claim, ("yes", "no"), 1 - truth, recall))
    return out


def _item(item_id: str, query: str, choices: tuple[str, ...], gold: int, recall: str) -> dict:
    return {"id": item_id, "query": query, "answer": choices[gold], "choices": list(choices), "gold": gold,
            "recall": recall}  # fmt: skip


def reply(kind: str, item: dict) -> str:
    """The SFT answer: the fact as pre-training stated it (the subject as "It"); for yes/no, then the answer.

    Recalling first lets the model reach a fact through the wording it was pre-trained on, instead of mapping a
    question straight to yes or no, which a small model does not learn to do for facts it never saw asked.
    """
    return f"{item['recall']} {ANSWER_CUE} {item['answer']}." if kind == "yesno" else item["recall"]


def sft_records(world: World, seed: int = 0) -> list[dict]:
    """Me-LLaMA instruction records on the training facts: every MC, yes/no and short item, shuffled."""
    found = items(world, held_out=False, seed=seed, variants=SFT_VARIANTS)
    records = [
        {"id": f"demo-{item['id']}", "conversations": [
            {"from": "human", "value": item["query"]}, {"from": "agent", "value": reply(kind, item)}]}
        for kind in ("mc", "yesno", "short") for item in found[kind]
    ]  # fmt: skip
    order = np.random.default_rng([seed, 4]).permutation(len(records))
    return [records[i] for i in order]


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_demo_data(
    out_dir: str | pathlib.Path, seed: int = 0, size: int = 150_000, tokenizer: str | pathlib.Path | None = None
) -> dict[str, pathlib.Path]:
    """Write the demo corpus into `out_dir` (see the module docstring); returns name -> path of each file.

    `size` is the CPT corpus in tokens of `tokenizer` (a tokenizer file or folder, e.g. LLaMA-2's), which the
    15:1:4 mixture is balanced by. Without one, the demo tokenizer is trained on the same documents and written to
    `out_dir/tokenizer` (key "tokenizer"), and the corpus is balanced by its tokens. At the default 150,000 tokens
    each of the 100 facts is stated in about 60 documents, which a model of a few layers picks up in minutes of CPU
    training.
    """
    if size < 2_000:
        raise UserError(f"demo corpus: size must be at least 2000 tokens, got {size}")
    out_dir = pathlib.Path(out_dir)
    world = make_world(seed)
    written = {}
    if tokenizer is None:
        # a tokenizer needs text and the token budget needs a tokenizer: train on the word-counted corpus (the
        # same stream prefixes), then cut the streams by its tokens; byte-level BPE encodes any text, so the
        # slightly different final prefix is covered
        sample = [doc for docs in cpt_documents(world, size, seed).values() for doc in docs]
        written["tokenizer"] = out_dir / "tokenizer"
        build_demo_tokenizer(sample, written["tokenizer"])
    tok = load_tokenizer(written.get("tokenizer", tokenizer))
    count = lambda text: len(tok.encode(text, add_special=False))  # noqa: E731
    for domain, docs in cpt_documents(world, size, seed, count).items():
        written[f"cpt/{domain}"] = out_dir / "cpt" / f"{domain}.jsonl"
        _write_jsonl(written[f"cpt/{domain}"], [{"text": doc} for doc in docs])
    written["sft/train"] = out_dir / "sft" / "train.jsonl"
    _write_jsonl(written["sft/train"], sft_records(world, seed))
    for kind, rows in items(world, held_out=True, seed=seed).items():
        written[f"eval/demo_{kind}"] = out_dir / "eval" / f"demo_{kind}.jsonl"
        _write_jsonl(written[f"eval/demo_{kind}"], [{k: v for k, v in row.items() if k != "recall"} for row in rows])
    return written


def build_demo_tokenizer(texts: list[str], out_dir: str | pathlib.Path, vocab_size: int = VOCAB_SIZE) -> None:
    """A byte-level BPE trained on `texts`, saved in `out_dir` as tokenizer.json + tokenizer_config.json.

    Byte-level, so any text (SFT prompts, eval queries) round-trips; BOS is added as LLaMA's tokenizer adds it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
