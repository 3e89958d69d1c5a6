"""`mellama decontaminate`: planted overlaps are found with their example ids and corpus places, checked against
a brute-force reference (sets of word tuples); disjoint text and 12-word overlaps give no hits; prepared shards,
raw files and a training YAML give the same answer; memory does not grow with the corpus."""

import hashlib
import json
import pathlib
import re
import shutil
import tracemalloc

import numpy as np
import pytest
import tokenizers

from mellama_jax.cli import main
from mellama_jax.errors import UserError
from mellama_jax.evaluation import decontaminate as dc
from mellama_jax.evaluation import tasks


def Example(id: str, text: str) -> tasks.Example:  # noqa: N802 (reads like the class it builds)
    return tasks.Example(id, prompt=f"Question: {text}", gold="yes", text=text)


def vocabulary(rng, size: int, letters: str) -> list[str]:
    return ["".join(rng.choice(list(letters), rng.integers(3, 9))) for _ in range(size)]


def reference_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())  # for ASCII text, the words dc.normalise keeps


def reference(examples: list[Example], documents: list[str], n: int = 13) -> dict[str, list[tuple[int, int]]]:
    """Brute force: example id -> [(document index, shared grams)] for every document sharing a gram."""

    def grams(words, length):
        return {tuple(words[i : i + length]) for i in range(len(words) - length + 1)}

    own = {}
    for e in examples:
        w = reference_words(e.text)
        if len(w) >= min(n, dc.MIN_WORDS):
            own[e.id] = grams(w, min(n, len(w)))
    found = {}
    for d, text in enumerate(documents):
        w = reference_words(text)
        for eid, g in own.items():
            shared = len(g & grams(w, len(next(iter(g)))))
            if shared:
                found.setdefault(eid, []).append((d, shared))
    return found


def punctuate(words: list[str], rng) -> str:
    """The words with changed case and punctuation around and between them, as a corpus might quote them."""
    marks = [" ", ", ", "; ", " - ", " (", ") ", ".", ": ", "\n", "/"]
    out = ""
    for w in words:
        out += w.upper() if rng.random() < 0.3 else w.capitalize() if rng.random() < 0.3 else w
        out += marks[rng.integers(len(marks))]
    return out


def synthetic(seed: int = 0, docs: int = 60):
    """Examples over one vocabulary, a corpus over a disjoint one, and planted runs of an example's words."""
    rng = np.random.default_rng(seed)
    eval_vocab, corpus_vocab = vocabulary(rng, 3000, "abcdefghijklm"), vocabulary(rng, 3000, "nopqrstuvwxyz")
    examples = [Example(f"ex{i}", " ".join(rng.choice(eval_vocab, rng.integers(20, 80))) + "?") for i in range(30)]
    documents = [" ".join(rng.choice(corpus_vocab, rng.integers(50, 400))) for _ in range(docs)]
    return rng, examples, documents


def plant(rng, documents: list[str], d: int, words: list[str]) -> None:
    cut = documents[d].split()
    at = int(rng.integers(len(cut) + 1))
    documents[d] = " ".join(cut[:at]) + "." + punctuate(words, rng) + "!" + " ".join(cut[at:])


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def report_of(examples, corpora, n=13) -> dict:
    return dc.scan(dc.build_index({"task": examples}, n), corpora).tasks()["task"]


def found(task: dict) -> dict[str, list[tuple[int, int]]]:
    return {e["id"]: [(p["document"], p["ngrams"]) for p in e["places"]] for e in task["examples"]}


def test_normalisation_lower_cases_and_splits_at_punctuation():
    assert dc.normalise("Dyschesia, (m.) PUBORECTALIS p<0.01 snake_case\tend.") == (
        "dyschesia m puborectalis p 0 01 snake case end"
    )
    assert dc.normalise("Ménière's ﬁbrosis, 5 mg/m²") == "ménière s fibrosis 5 mg m2"  # NFKC: ligature, superscript
    assert dc.normalise("Me\u0301nie\u0300re") == dc.normalise("Ménière")  # decomposed accents: the same word


def test_word_hashes_agree_exactly_when_the_words_do():
    rng = np.random.default_rng(0)
    vocab = vocabulary(rng, 3000, "abcdefghijklmnopqrstuvwxyz0123456789é") + ["x" * 70, "x" * 69 + "y", "xy" * 40]
    text = " ".join(rng.choice(vocab, 20000))
    hashes, words = dc.word_hashes(text), dc.normalise(text).split()
    assert len(hashes) == len(words) == 20000
    first = {}
    for w, h in zip(words, hashes.tolist(), strict=True):
        assert first.setdefault(w, h) == h
    assert len(set(first.values())) == len(first)  # distinct words, distinct hashes


def test_planted_overlaps_are_found_with_ids_places_and_counts(tmp_path):
    rng, examples, documents = synthetic()
    plants = {3: (0, 13), 10: (5, 40), 20: (17, 31), 44: (0, 30)}  # document -> example 0..3's words [a:b]
    for k, (d, (a, b)) in enumerate(plants.items()):
        plant(rng, documents, d, reference_words(examples[k].text)[a:b])
    plant(rng, documents, 50, reference_words(examples[0].text)[2:20])  # a second place of example 0
    path = write_jsonl(tmp_path / "corpus.jsonl", documents)
    task = report_of(examples, dc.open_corpora([str(path)]))
    expected = reference(examples, documents)
    assert set(expected) == {"ex0", "ex1", "ex2", "ex3"}  # the reference sees the plants, nothing else
    assert found(task) == expected
    assert (task["checked"], task["contaminated"], task["fraction"]) == (30, 4, 4 / 30)
    ex0 = next(e for e in task["examples"] if e["id"] == "ex0")
    assert [p["where"] for p in ex0["places"]] == [f"{path}:4", f"{path}:51"]  # file:line of documents 3 and 50
    assert ex0["documents"] == 2 and ex0["of"] == len(reference_words(examples[0].text)) - 12


def test_disjoint_text_and_12_word_overlaps_are_not_hits(tmp_path):
    rng, examples, documents = synthetic(seed=1)
    for k, e in enumerate(examples):  # every example's words, cut into runs of 12 in separate documents
        w = reference_words(e.text)
        for a in range(0, len(w) - 11, 11):
            plant(rng, documents, (k * 7 + a) % len(documents), w[a : a + 12])
    corpora = dc.open_corpora([str(write_jsonl(tmp_path / "corpus.jsonl", documents))])
    assert reference(examples, documents) == {}
    task = report_of(examples, corpora)
    assert (task["contaminated"], task["examples"]) == (0, [])
    assert report_of(examples, corpora, n=12)["contaminated"] > 0  # the same corpus, 12-grams: hits


def test_a_short_text_is_one_gram_and_a_very_short_one_is_not_checked(tmp_path):
    rng, _, documents = synthetic(seed=2, docs=10)
    examples = [Example("nine", "alpha beta gamma delta epsilon zeta eta theta iota"),
                Example("nine-elsewhere", "alpha beta gamma delta epsilon zeta eta theta kappa"),
                Example("five", "Is it alpha beta gamma?")]  # fmt: skip
    plant(rng, documents, 4, reference_words(examples[0].text))
    plant(rng, documents, 6, reference_words(examples[1].text)[:8])  # 8 of its 9 words: not the whole text
    plant(rng, documents, 7, reference_words(examples[2].text))
    task = report_of(examples, dc.open_corpora([str(write_jsonl(tmp_path / "c.jsonl", documents))]))
    assert found(task) == {"nine": [(4, 1)]} == reference(examples, documents)
    assert (task["checked"], task["too_short"]) == (3, 1)


@pytest.fixture
def tokenizer(shared_data):
    return str(shared_data / "llama2_tokenizer.model")


def test_prepared_shards_a_yaml_and_raw_files_give_the_same_report(tmp_path, tokenizer):
    rng, examples, documents = synthetic(seed=3, docs=40)
    documents[5] = "Ménière’s “disease” — " + documents[5]  # non-ASCII text through the tokenizer and back
    for k, d in enumerate((2, 5, 9, 33)):
        plant(rng, documents, d, reference_words(examples[k].text)[k : k + 14 + k])
    write_jsonl(tmp_path / "a.jsonl", documents[:25])
    write_jsonl(tmp_path / "b.jsonl", documents[25:])
    raw = report_of(examples, dc.open_corpora([str(tmp_path / "*.jsonl")]))
    assert main(["prepare", str(tmp_path / "*.jsonl"), "--tokenizer", tokenizer, "--out", str(tmp_path / "p"),
                 "--workers", "1"]) == 0  # fmt: skip
    prepared = report_of(examples, dc.open_corpora([str(tmp_path / "p")], tokenizer))
    assert found(raw) == found(prepared) == reference(examples, documents) and len(found(raw)) == 4
    assert [p["where"] for e in prepared["examples"] for p in e["places"]] == [
        f"{tmp_path / 'p' / 'shard-00000.array_record'}:record {d + 1}" for d in (2, 5, 9)
    ] + [f"{tmp_path / 'p' / 'shard-00001.array_record'}:record 9"]
    config = tmp_path / "cpt.yaml"
    config.write_text(f"data:\n  kind: cpt\n  tokenizer: {tokenizer}\n  sources:\n"
                      f"    - {{name: prep, paths: [{tmp_path / 'p'}], format: prepared}}\n"
                      f"    - {{name: rawa, paths: [{tmp_path / 'a.jsonl'}]}}\n")  # fmt: skip
    both = report_of(examples, dc.open_corpora([str(config)]))
    places = [(p["source"], p["document"]) for e in both["examples"] for p in e["places"]]
    assert sorted(places) == sorted([("prep", d) for d in (2, 5, 9, 33)] + [("rawa", d) for d in (2, 5, 9)])


def test_memory_is_the_index_and_one_document_whatever_the_corpus_size(tmp_path):
    rng, examples, documents = synthetic(seed=4, docs=400)
    for d in range(0, 400, 3):  # example 0 everywhere: its places stop at PLACES, its document count does not
        plant(rng, documents, d, reference_words(examples[0].text)[:13])
    index = dc.build_index({"task": examples})
    peaks = []
    for copies in (1, 10):
        corpus = dc.open_corpora([str(write_jsonl(tmp_path / f"c{copies}.jsonl", documents * copies))])
        tracemalloc.start()
        result = dc.scan(index, corpus)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        (ex0,) = result.tasks()["task"]["examples"]
        assert (len(ex0["places"]), ex0["documents"]) == (dc.PLACES, 134 * copies)
    assert peaks[1] < 1.5 * peaks[0], peaks  # 10x the corpus, about the same memory


def test_contaminated_ids_reads_our_report_and_refuses_anything_else(tmp_path):
    report = {"kind": dc.KIND, "settings": {}, "tasks": {"pubmedqa": {"examples": [{"id": "123"}, {"id": "9"}]},
                                                        "medqa": {"examples": []}}}  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert dc.contaminated_ids(tmp_path / "r.json") == {"pubmedqa": {"123", "9"}, "medqa": set()}
    (tmp_path / "other.json").write_text(json.dumps({"tasks": {}}))
    (tmp_path / "bad.json").write_text("{")
    for name in ("other.json", "bad.json", "missing.json"):
        with pytest.raises(UserError, match=re.escape(str(tmp_path / name))):
            dc.contaminated_ids(tmp_path / name)


def test_prepared_data_needs_the_tokenizer_that_made_it(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", ["some text here"])
    assert main(["prepare", str(tmp_path / "a.jsonl"), "--tokenizer", tokenizer, "--out", str(tmp_path / "p")]) == 0
    with pytest.raises(UserError, match="pass --tokenizer"):
        dc.open_corpora([str(tmp_path / "p")])
    other = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "some": 1}, unk_token="[UNK]"))
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="tokenizer.json: not the tokenizer .* was prepared with"):
        dc.open_corpora([str(tmp_path / "p")], str(tmp_path / "tokenizer.json"))
    assert dc.open_corpora([str(tmp_path / "p")], tokenizer)[0].reader.count == 1


def test_worker_processes_find_what_one_process_finds(tmp_path, monkeypatch):
    rng, examples, documents = synthetic(seed=5, docs=50)
    for d in (1, 8, 9, 30, 31, 49):  # in several stretches, one example in more than PLACES documents
        plant(rng, documents, d, reference_words(examples[d % 3].text)[:15])
    for d in range(25):
        plant(rng, documents, d, reference_words(examples[7].text)[:13])
    write_jsonl(tmp_path / "c.jsonl", documents)
    (tmp_path / "c.jsonl").write_text((tmp_path / "c.jsonl").read_text() + "not json\n")
    config = tmp_path / "skip.yaml"
    config.write_text(f"data: {{kind: cpt, on_error: skip, sources: [{{name: c, paths: [{tmp_path / 'c.jsonl'}]}}]}}\n")
    corpora = dc.open_corpora([str(config)])
    index = dc.build_index({"task": examples})
    monkeypatch.setattr(dc, "CHUNK", 7)  # 8 stretches
    one, two = dc.scan(index, corpora, workers=1), dc.scan(index, corpora, workers=2)
    expected, task = reference(examples, documents), two.tasks()["task"]
    assert one.tasks()["task"] == task and found(task) == {k: v[: dc.PLACES] for k, v in expected.items()}
    assert {e["id"]: e["documents"] for e in task["examples"]} == {k: len(v) for k, v in expected.items()}
    assert (one.scanned, one.words, one.skipped) == (two.scanned, two.words, two.skipped) == (50, one.words, {"c": 1})


def test_sft_records_are_checked_field_by_field(tmp_path):
    rng, examples, _ = synthetic(seed=6)
    records = [
        {"instruction": "Answer.", "input": "", "output": "Nothing."},
        {
            "conversations": [
                {"from": "human", "value": "Q?"},
                {"from": "agent", "value": punctuate(reference_words(examples[4].text), rng)},
            ]
        },
    ]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "sft.yaml"
    config.write_text(f"data:\n  kind: sft\n  sources:\n    - {{name: chat, paths: [{tmp_path / 'sft.jsonl'}]}}\n")
    assert found(report_of(examples, dc.open_corpora([str(config)]))) == {
        "ex4": [(1, len(reference_words(examples[4].text)) - 12)]
    }


def pubmedqa_rows(shared_data) -> list[dict]:
    return [json.loads(line) for line in (shared_data / "medical" / "pubmedqa_pqal.sample40.jsonl").open()]


def test_the_command_finds_real_pubmedqa_abstracts_in_raw_and_prepared_corpora(tmp_path, shared_data, tokenizer,
                                                                               capsys):  # fmt: skip
    rows, (_, _, documents) = pubmedqa_rows(shared_data), synthetic(seed=7, docs=30)
    for d, r in ((4, 2), (11, 17), (25, 33)):  # an abstract section of rows 2, 17, 33 quoted in a document
        documents[d] = documents[d][:40] + " ... As reported: " + " ".join(rows[r]["contexts"][-1:]).upper()
    planted = {rows[r]["pmid"] for r in (2, 17, 33)}
    corpus = str(write_jsonl(tmp_path / "corpus.jsonl", documents))
    examples = [Example(r["pmid"], r["question"] + " " + " ".join(r["contexts"])) for r in rows]
    assert set(reference(examples, documents)) == planted
    medical = str(shared_data / "medical")
    assert main(["prepare", corpus, "--tokenizer", tokenizer, "--out", str(tmp_path / "p")]) == 0
    reports = {}
    for name, data in (("raw", [corpus]), ("prepared", [str(tmp_path / "p")])):
        capsys.readouterr()
        out = tmp_path / f"{name}.json"
        assert main(["decontaminate", "--data", *data, "--tasks", "pubmedqa", "--data-dir", medical, "--out", str(out),
                     "--tokenizer", tokenizer]) == 0  # fmt: skip
        printed = capsys.readouterr().out
        assert "pubmedqa: 3 of 40 examples contaminated (7.5%)" in printed
        assert dc.contaminated_ids(out) == {"pubmedqa": planted}
        reports[name] = json.loads(out.read_text())
        for text in (printed, out.read_text()):  # ids and places, never the text
            assert rows[2]["contexts"][-1][:40].lower() not in text.lower()
    raw, prepared = (reports[k]["tasks"]["pubmedqa"] for k in ("raw", "prepared"))
    assert found(raw) == found(prepared) == reference(examples, documents)
    assert reports["raw"]["settings"]["words"] == reports["prepared"]["settings"]["words"]
    assert [p["where"] for e in raw["examples"] for p in e["places"]] == [
        f"{corpus}:{d + 1}" for d in (4, 11, 25)]  # fmt: skip


def test_bad_input_is_one_line_naming_the_culprit(tmp_path, shared_data, tokenizer, capsys):
    corpus = str(write_jsonl(tmp_path / "c.jsonl", ["a b c"]))
    medical = str(shared_data / "medical")
    report = tmp_path / "r.json"
    report.write_text("mine")
    assert main(["prepare", corpus, "--tokenizer", tokenizer, "--out", str(tmp_path / "p")]) == 0
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], f"{tmp_path / 'missing.jsonl'}: no such file"),
        (["--data", str(tmp_path / "p")], f"{tmp_path / 'p'}: its token ids are read as text"),
        (["--data", corpus, "--tasks", "pubmedqa,nope"], "--tasks: unknown task 'nope'"),
        (["--data", corpus, "--out", str(report)], f"{report}: exists; pass --overwrite"),
        (["--data", corpus, "--data-dir", str(tmp_path)], f"pubmedqa: no data file in {tmp_path} (tried "),
        (["--data", corpus, "--data-dir", str(tmp_path), "--tasks", "all"], f"{tmp_path}: no file of any task"),
        (["--data", corpus, "--limit", "0"], "--limit must be at least 1"),
    ]
    for args, message in cases:
        defaults = {"--tasks": "pubmedqa", "--data-dir": medical, "--out": str(tmp_path / "new.json")}
        flags = [x for k, v in defaults.items() if k not in args for x in (k, v)]
        capsys.readouterr()
        assert main(["decontaminate", *args, *flags]) == 2, args
        *warnings, error = capsys.readouterr().err.splitlines()  # warnings: the tasks "all" found no file of
        assert error.startswith("mellama decontaminate: error: ") and message in error, error
        assert all(": WARNING: " in w and " skipped" in w for w in warnings), warnings
    assert report.read_text() == "mine" and not (tmp_path / "new.json").exists()
    (tmp_path / "mibe").mkdir()  # a copy: a failing check must not write over the shared data
    shutil.copy(shared_data / "medical" / "pubmedqa_pqal.sample40.jsonl", tmp_path / "mibe")
    for inputs in (corpus, str(tmp_path / "mibe" / "pubmedqa_pqal.sample40.jsonl")):  # --overwrite or not
        before = pathlib.Path(inputs).read_bytes()
        assert main(["decontaminate", "--data", corpus, "--tasks", "pubmedqa", "--data-dir", str(tmp_path / "mibe"),
                     "--out", inputs, "--overwrite"]) == 2  # fmt: skip
        assert f"--out {inputs}: would replace the input" in capsys.readouterr().err
        assert pathlib.Path(inputs).read_bytes() == before
    assert main(["decontaminate", "--data", corpus, "--tasks", "pubmedqa", "--data-dir", medical, "--out", str(report),
                 "--limit", "5", "--overwrite"]) == 0  # fmt: skip
    entry = json.loads(report.read_text())["tasks"]["pubmedqa"]
    assert entry["checked"] == 5  # and the file its ids are of, for `mellama eval --exclude-contaminated` to check
    data = (shared_data / "medical" / "pubmedqa_pqal.sample40.jsonl").read_bytes()
    assert entry["data_sha256"] == f"sha256:{hashlib.sha256(data).hexdigest()}"
