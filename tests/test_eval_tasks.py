"""MIBE tasks: the registry, loading real rows (shared data), synthetic rows (tests/data/mibe), the hosted schema,
file discovery and one-line errors. Gold labels are checked against the raw rows by hand-written rules."""

import json
import pathlib

import pytest

from mellama_jax.errors import UserError
from mellama_jax.evaluation.tasks import MIBE, TASKS, Example, select

SYNTHETIC = pathlib.Path(__file__).parent / "data" / "mibe"


def _rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- registry ------------------------------------------------------------------------------------------------


def test_registry_order_and_paper_numbers():
    # DESIGN §2's order, with MedQA's 4-option release next to MedQA
    assert list(MIBE) == list(TASKS)[: len(MIBE)] == [
        "pubmedqa", "medqa", "medqa_4opt", "medmcqa", "emrqa", "i2b2", "ddi",
        "hoc", "mtsample", "pubmed_summ", "mimic_cxr", "bionli", "mednli",
    ]  # fmt: skip
    # DESIGN §2: Me-LLaMA-70B-chat zero-shot
    expected = {
        "pubmedqa": {"accuracy": 0.768},
        "medqa": {"accuracy": 0.523},
        "medmcqa": {"accuracy": 0.539},
        "hoc": {"macro_f1": 0.544},
        "ddi": {"macro_f1": 0.283},
        "mednli": {"macro_f1": 0.675},
    }
    for name, task in TASKS.items():
        assert task.paper == expected.get(name, {}), name
        assert set(task.paper) <= set(task.metrics), name
        assert task.name == name and task.title and task.metrics and task.patterns


def test_select():
    assert [t.name for t in select("all")] == list(MIBE)  # the demo tasks (test_demo_data.py) are not in "all"
    assert [t.name for t in select("medqa, pubmedqa,medqa")] == ["medqa", "pubmedqa"]
    with pytest.raises(UserError, match=r"unknown task 'pubmed'; valid: all, pubmedqa, medqa, .*mednli"):
        select("pubmedqa,pubmed")
    with pytest.raises(UserError, match="no task given"):
        select(" , ")


# --- the shared real rows --------------------------------------------------------------------------------------


def test_shared_rows_load_with_their_gold(shared_data):
    medical = shared_data / "medical"
    for name in ("pubmedqa", "medqa", "medqa_4opt", "medmcqa", "ddi", "hoc"):
        examples = TASKS[name].load(medical)
        assert len(examples) == 40, name
        assert len({e.id for e in examples}) == 40, name
        for e in examples:
            assert e.prompt.rstrip().endswith(("Output:", "OUTPUT:")), name
            assert e.text in e.prompt, name

    raw = _rows(medical / "pubmedqa_pqal.sample40.jsonl")
    pubmedqa = TASKS["pubmedqa"].load(medical)
    assert [e.id for e in pubmedqa] == [r["pmid"] for r in raw]
    assert [e.gold for e in pubmedqa] == [r["final_decision"] for r in raw]
    assert pubmedqa[0].id == "12377809" and pubmedqa[0].choices == ("yes", "no", "maybe")
    assert raw[0]["question"] in pubmedqa[0].text and raw[0]["contexts"][-1] in pubmedqa[0].text

    # The gold letter's option text is the row's answer text, in both MedQA releases.
    for name, file in (("medqa", "medqa_usmle_5opt"), ("medqa_4opt", "medqa_usmle_4opt")):
        raw = _rows(medical / f"{file}.sample40.jsonl")
        for e, r in zip(TASKS[name].load(medical), raw, strict=True):
            assert f"\n{e.gold}. {r['answer']}" in e.text
    assert TASKS["medqa"].load(medical)[0].gold == "C"  # the same question: C of 5 options, B of 4
    assert TASKS["medqa_4opt"].load(medical)[0].gold == "B"
    assert TASKS["medqa"].load(medical)[0].choices == ("A", "B", "C", "D", "E")

    # MedMCQA's cop is 1-based: 1 = opa = "A".
    raw = _rows(medical / "medmcqa.sample40.jsonl")
    medmcqa = TASKS["medmcqa"].load(medical)
    assert raw[0]["cop"] == 1 and medmcqa[0].gold == "A" and medmcqa[0].id == raw[0]["id"]
    for e, r in zip(medmcqa, raw, strict=True):
        assert e.gold == "ABCD"[r["cop"] - 1]
        assert f"{e.gold}. {r['op' + e.gold.lower()]}" in e.text

    raw = _rows(medical / "ddi2013.sample40.jsonl")
    ddi = TASKS["ddi"].load(medical)
    assert [(e.id, e.gold, e.text) for e in ddi] == [(r["index"], r["label"], r["sentence"]) for r in raw]

    raw = _rows(medical / "hoc.sample40.jsonl")
    hoc = TASKS["hoc"].load(medical)
    assert [set(e.gold) for e in hoc] == [set(r["labels"]) for r in raw]
    assert hoc[0].id == "11872299" and len(hoc[0].choices) == 10


def test_shared_folder_misses_the_credentialed_sets(shared_data):
    with pytest.raises(UserError, match=r"mednli: no data file in .*medical \(tried mednli\*\.json\*, mli_test"):
        TASKS["mednli"].load(shared_data / "medical")


# --- synthetic rows in the original formats ----------------------------------------------------------------------


def test_synthetic_rows_load():
    counts = {"emrqa": 6, "i2b2": 7, "mtsample": 7, "pubmed_summ": 5, "mimic_cxr": 6, "bionli": 6, "mednli": 6}
    for name, count in counts.items():
        examples = TASKS[name].load(SYNTHETIC)
        assert len(examples) == count, name
        assert all(e.text and e.text in e.prompt for e in examples), name


def test_synthetic_golds():
    emrqa = TASKS["emrqa"].load(SYNTHETIC)
    assert (emrqa[0].id, emrqa[0].gold) == ("synth-q1", "10 mg daily")
    # emrQA's own layout: the note as a list of lines, the question as a list of paraphrases
    assert emrqa[5].gold == "amoxicillin" and "Which drug was stopped" in emrqa[5].text
    assert "stopping amoxicillin.\nFollow up" in emrqa[5].text

    i2b2 = TASKS["i2b2"].load(SYNTHETIC)
    assert i2b2[0].id == "synth-record-1:1"
    assert i2b2[0].gold == 'Patient is a 60 year old man admitted with <span class="problem">chest pain</span> .'
    assert i2b2[1].gold == '<span class="test">An ECG</span> showed <span class="problem">sinus rhythm</span> .'
    assert i2b2[3].id == "synth-record-1:5"  # the empty line 4 is no example
    assert i2b2[6].gold == (
        '<span class="test">A chest x-ray</span> revealed <span class="problem">a right lower lobe pneumonia</span>'
        ' , treated with <span class="treatment">ceftriaxone</span> .'
    )

    mtsample = TASKS["mtsample"].load(SYNTHETIC)
    specialties = ("Cardiovascular / Pulmonary", "Neurology", "Orthopedic", "Surgery")
    assert [e.gold for e in mtsample] == [specialties[i] for i in (0, 0, 3, 3, 1, 1, 2)]  # row 7: no transcription
    assert all(e.choices == specialties for e in mtsample)
    assert "Cardiovascular / Pulmonary, Neurology, Orthopedic, Surgery." in mtsample[0].prompt

    summ = TASKS["pubmed_summ"].load(SYNTHETIC)
    assert [e.id for e in summ] == ["synth-pm-1", "synth-pm-2", "synth-pm-3", "synth-pm-4", "synth-pm-6"]
    assert summ[0].gold == (
        "vitamin d supplements reduced back pain in adults with low vitamin d levels . larger trials are needed ."
    )
    assert summ[0].text.startswith("vitamin d levels were measured") and "<S>" not in summ[0].prompt

    cxr = TASKS["mimic_cxr"].load(SYNTHETIC)
    assert (cxr[1].id, cxr[1].gold) == ("50000002", "Right lower lobe opacity, concerning for pneumonia.")

    bionli = TASKS["bionli"].load(SYNTHETIC)
    assert [e.gold for e in bionli] == ["entailment", "contradiction"] * 3  # "pos" vs a perturbation category
    mednli = TASKS["mednli"].load(SYNTHETIC)
    assert [e.gold for e in mednli] == ["entailment", "contradiction", "neutral"] * 2
    assert mednli[2].choices == ("entailment", "contradiction", "neutral")


def test_mimic_cxr_raw_report_layout(tmp_path):
    report = (
        "FINAL REPORT\nINDICATION: Cough.\n\nFINDINGS: Lungs are clear.\n No effusion.\n\nIMPRESSION: Normal chest."
    )
    _write_jsonl(tmp_path / "mimic_cxr_reports.jsonl", [{"study_id": 7, "report": report}, {"report": "No sections."}])
    (example,) = TASKS["mimic_cxr"].load(tmp_path)  # the report without sections is skipped
    assert (example.id, example.text, example.gold) == ("7", "Lungs are clear. No effusion.", "Normal chest.")


def test_limit_and_one_shot():
    examples = TASKS["mednli"].load(SYNTHETIC, limit=2)
    assert [e.id for e in examples] == ["synth-mednli-1", "synth-mednli-2"]
    task = TASKS["mednli"]
    assert task.prompt(examples[1]) == examples[1].prompt
    assert task.prompt(examples[1], shot=examples[0]) == f"{examples[0].prompt} entailment\n\n{examples[1].prompt}"
    hoc_shot = Example("s", "Q:", ("inducing angiogenesis", "cellular energetics"), "t", TASKS["hoc"].choices)
    assert TASKS["hoc"].prompt(examples[0], hoc_shot).startswith("Q: inducing angiogenesis; cellular energetics\n\n")
    with pytest.raises(UserError, match="--limit must be at least 1"):
        task.load(SYNTHETIC, limit=0)


# --- the hosted-eval schema -------------------------------------------------------------------------------------------


def test_hosted_rows(tmp_path):
    query = "Context: ... Question: Is it?\nAnswer:"
    _write_jsonl(
        tmp_path / "PubMedQA_test.jsonl",  # names match case-insensitively
        [
            {
                "id": "p1",
                "query": query,
                "answer": "no",
                "choices": ["yes", "no", "maybe"],
                "gold": 1,
                "text": "Is it?",
            },
            {"id": "p2", "query": query, "answer": "maybe", "choices": ["yes", "no", "maybe"], "gold": 2},
        ],
    )
    first, second = TASKS["pubmedqa"].load(tmp_path)
    assert first == Example("p1", query, "no", "Is it?", ("yes", "no", "maybe"))
    assert (second.gold, second.text) == ("maybe", query)  # no `text`: the query is what the model reads

    choices = list(TASKS["hoc"].choices)
    hot = [0, 0, 1, 0, 1, 0, 0, 0, 0, 0]
    _write_jsonl(tmp_path / "hoc_test.jsonl", [{"id": 1, "query": "q", "answer": "a", "choices": choices, "gold": hot}])
    (hoc,) = TASKS["hoc"].load(tmp_path)
    assert hoc.gold == ("resisting cell death", "inducing angiogenesis") and hoc.id == "1"

    _write_jsonl(tmp_path / "emrqa_test.jsonl", [{"id": "e1", "query": "note ... Answer:", "answer": "5 mg"}])
    assert TASKS["emrqa"].load(tmp_path)[0] == Example("e1", "note ... Answer:", "5 mg", "note ... Answer:")


# --- discovery and one-line errors -----------------------------------------------------------------------------------


def test_find(tmp_path):
    with pytest.raises(UserError, match=r"pubmedqa: no data file in .* \(tried pubmedqa\*\.json\*, ori_pqal\.json\)"):
        TASKS["pubmedqa"].find(tmp_path)
    (tmp_path / "medqa_usmle_4opt.jsonl").write_text("")
    with pytest.raises(UserError, match="medqa: no data file"):  # the 4-option file is not MedQA's
        TASKS["medqa"].find(tmp_path)
    assert TASKS["medqa_4opt"].find(tmp_path).name == "medqa_usmle_4opt.jsonl"
    (tmp_path / "pubmedqa_a.jsonl").write_text("")
    (tmp_path / "pubmedqa_b.jsonl").write_text("")
    with pytest.raises(UserError, match="several files .* match 'pubmedqa\\*\\.json\\*': pubmedqa_a.jsonl, pubmedqa_b"):
        TASKS["pubmedqa"].find(tmp_path)
    with pytest.raises(UserError, match="is not a folder"):
        TASKS["pubmedqa"].find(tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "rows", "message"),
    [
        (
            "pubmedqa",
            ['{"pmid": "1", "question": "q", "contexts": ["c"], "final_decision": "no"}', "{not json"],
            r"pubmedqa_x.jsonl:2: not valid JSON",
        ),
        (
            "pubmedqa",
            [{"pmid": "1", "contexts": ["c"], "final_decision": "yes"}],
            r"\.jsonl:1: missing field 'question'",
        ),
        (
            "pubmedqa",
            [{"pmid": "1", "question": "q", "contexts": ["c"], "final_decision": "perhaps"}],
            r"\.jsonl:1: field 'final_decision' must be one of yes, no, maybe, got 'perhaps'",
        ),
        (
            "medmcqa",
            [{"id": "m", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0}],
            r"medmcqa_x.jsonl:1: field 'cop' must be 1-4 \(1-based: 1 = opa\), got 0",
        ),
        ("medqa", [{"question": "q", "options": {"A": "a"}, "answer_idx": "A"}], r":1: field 'options' must map"),
        ("ddi", [{"sentence": "s", "label": "DDI-effect"}, ["a", "list"]], r"ddi_x.jsonl:2: expected a JSON object"),
        (
            "pubmedqa",
            [{"id": 1, "query": "q", "answer": "yes", "choices": ["yes", "no"], "gold": 2}],
            r":1: field 'gold' must index choices \(0\.\.1\), got 2",
        ),
        (
            "mednli",
            [{"pairID": "a", "sentence1": "s", "sentence2": "t", "gold_label": "entailment"}] * 2,
            r"mednli_x.jsonl:2: duplicate id 'a' \(first at .*mednli_x.jsonl:1\)",
        ),
    ],
)
def test_malformed_rows(tmp_path, name, rows, message):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    suffix = "_x.jsonl" if name != "medqa" else "_5opt_x.jsonl"
    (tmp_path / f"{name}{suffix}").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message) as error:
        TASKS[name].load(tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("task", "name", "content", "message"),
    [
        ("pubmedqa", "pubmedqa_x.jsonl", b'{"pmid": "1"}\n{"pmid": "caf\xe9"}\n', "pubmedqa_x.jsonl:2: not UTF-8 text"),
        ("emrqa", "emrqa_x.json", b'{"data": [\n{"title": "\xff"}]}', "emrqa_x.json:2: not UTF-8 text"),
        (
            "mtsample",
            "mtsamples.csv",
            b"medical_specialty,transcription\nSurgery,caf\xe9\n",
            "mtsamples.csv:2: not UTF-8",
        ),
    ],
)
def test_files_that_are_not_utf8_are_one_line_errors_naming_the_line(tmp_path, task, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        TASKS[task].load(tmp_path)


def test_hosted_ids_must_be_strings_or_integers_and_a_byte_order_mark_is_allowed(tmp_path):
    row = {"query": "q", "answer": "yes", "choices": ["yes", "no"], "gold": 0}
    _write_jsonl(tmp_path / "pubmedqa_x.jsonl", [{**row, "id": ["p1"]}])
    with pytest.raises(UserError, match=r"pubmedqa_x.jsonl:1: field 'id' must be str or int, got list"):
        TASKS["pubmedqa"].load(tmp_path)
    (tmp_path / "pubmedqa_x.jsonl").write_text("\ufeff" + json.dumps({**row, "id": 7}) + "\n", encoding="utf-8")
    assert TASKS["pubmedqa"].load(tmp_path)[0].id == "7"
    csv = "\ufeff,description,medical_specialty,transcription\n12,d, Surgery,t\n"  # Excel's UTF-8 CSV
    (tmp_path / "mtsamples.csv").write_text(csv, encoding="utf-8")
    assert TASKS["mtsample"].load(tmp_path)[0].id == "12"


def test_malformed_nested_files(tmp_path):
    (tmp_path / "emrqa_x.json").write_text('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q"}]}]}]}')
    with pytest.raises(
        UserError, match=r"emrqa_x.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'question'"
    ):
        TASKS["emrqa"].load(tmp_path)

    notes = tmp_path / "i2b2_test"
    notes.mkdir()
    (notes / "n1.txt").write_text("Pain in the chest .\n")
    (notes / "n1.con").write_text('c="pain" 1:0 1:0||t="problem"\nc="the lungs" 1:2 1:3||t="problem"\n')
    with pytest.raises(UserError, match=r"n1.con:2: the concept's words do not match the note's tokens at 1:2") as e:
        TASKS["i2b2"].load(tmp_path)
    assert "lungs" not in str(e.value)  # no clinical text in messages
    (notes / "n1.con").write_text('c="pain" 1:0 1:0||t="problem"\nc="chest" 9:0 9:0||t="problem"\n')
    with pytest.raises(UserError, match=r"n1.con:2: offsets 9:0 9:0 are outside the note's text"):
        TASKS["i2b2"].load(tmp_path)

    (tmp_path / "mtsamples.csv").write_text("description,medical_specialty\nd, Surgery\n")
    with pytest.raises(UserError, match=r"mtsamples.csv:2: missing field 'transcription'"):
        TASKS["mtsample"].load(tmp_path)


SHARED_TASKS = ("pubmedqa", "medqa", "medqa_4opt", "medmcqa", "ddi", "hoc")


@pytest.mark.parametrize("name", MIBE)
def test_gold_answers_score_perfectly(name, request):
    """Every task's own gold answer, written as the model should write it, parses back to the gold (both parsers)."""
    task = TASKS[name]
    folder = request.getfixturevalue("shared_data") / "medical" if name in SHARED_TASKS else SYNTHETIC
    examples = task.load(folder)
    perfect = {m: 1.0 for m in task.metrics if m != "bertscore_f1"}
    for parse in (task.parse, task.parse_strict):
        scores = task.score(examples, [parse(task.answer_text(e), e) for e in examples])
        assert {m: scores[m] for m in perfect} == pytest.approx(perfect, abs=1e-12), parse.__name__
