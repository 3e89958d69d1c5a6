"""The built-in demo corpus: the 15:1:4 token mixture, the held-out split, SFT records, eval files through the demo
tasks, determinism and the demo tokenizer."""

import json
import re

import pytest
import sentencepiece as spm
import transformers
from sklearn.metrics import accuracy_score

from mellama_jax.data.sft import turns
from mellama_jax.data.tokenizer import load_tokenizer
from mellama_jax.demo.corpus import SFT_VARIANTS, items, make_world, reply, write_demo_data
from mellama_jax.errors import UserError
from mellama_jax.evaluation.tasks import MIBE, TASKS, select

DEMO = ("demo_mc", "demo_yesno", "demo_short")
SHARES = {"biomedical": 15 / 20, "clinical": 1 / 20, "general": 4 / 20}


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_data(out, seed=0)


def cpt_texts(files) -> dict[str, list[str]]:
    return {domain: [r["text"] for r in read(files[f"cpt/{domain}"])] for domain in SHARES}


def shares(texts: dict[str, list[str]], count) -> dict[str, float]:
    tokens = {domain: sum(count(t) for t in docs) for domain, docs in texts.items()}
    return {domain: n / sum(tokens.values()) for domain, n in tokens.items()}


def test_the_cpt_text_is_mixed_15_1_4_by_tokens_of_the_demo_tokenizer(demo):
    out, files = demo
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(files["tokenizer"] / "tokenizer.json"))
    texts = cpt_texts(files)
    measured = shares(texts, lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    total = sum(len(tok(t)["input_ids"]) for docs in texts.values() for t in docs)
    assert 150_000 <= total < 155_000  # the default size, overshot by at most a document per domain
    for domain, share in SHARES.items():
        # each domain stops at the first document past its budget: documents are < 300 tokens, 0.2% of the total
        assert measured[domain] == pytest.approx(share, abs=0.002), (domain, measured)


def test_a_given_tokenizer_balances_the_mixture_in_its_own_tokens(tmp_path, shared_data):
    model = shared_data / "llama2_tokenizer.model"
    files = write_demo_data(tmp_path, seed=0, size=40_000, tokenizer=model)
    assert "tokenizer" not in files and not (tmp_path / "tokenizer").exists()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    measured = shares(cpt_texts(files), lambda t: len(sp.encode(t)))
    for domain, share in SHARES.items():
        assert measured[domain] == pytest.approx(share, abs=0.008), (domain, measured)  # 300 of 40,000 tokens


def test_held_out_names_never_reach_sft_and_their_facts_are_in_the_cpt_text(demo):
    _, files = demo
    world = make_world(0)
    sft = files["sft/train"].read_text(encoding="utf-8").lower()
    held = [*world.held_out_drugs, *world.held_out_diseases]
    assert len(world.held_out_drugs) >= 8 and len(world.held_out_diseases) >= 4
    assert not [name for name in held if name.lower() in sft]
    training = [d for d in world.drug_class if d not in world.held_out_drugs]
    assert all(d.lower() in sft for d in training)  # the check above can fail: the names are findable
    sentences = [s for docs in cpt_texts(files).values() for t in docs for s in re.split(r"(?<=\.) ", t)]
    for relation, subject, obj in world.facts(held_out=True):
        together = sum(subject in s and obj in s for s in sentences)
        assert together >= 20, (relation, subject, obj, together)  # every held-out fact is stated many times


def test_eval_items_ask_only_held_out_facts(demo):
    out, _ = demo
    world = make_world(0)
    held = [*world.held_out_drugs, *world.held_out_diseases]
    for name in DEMO:
        for example in TASKS[name].load(out / "eval"):
            assert any(h in example.prompt for h in held), example.id


def test_sft_records_parse_as_me_llama_conversations(demo):
    records = read(demo[1]["sft/train"])
    assert len(records) > 500 and len({r["id"] for r in records}) == len(records)
    finals = set()
    for i, record in enumerate(records):
        ((prompt, answer),) = turns(record, f"train.jsonl:{i + 1}")
        assert prompt.startswith("TASK: ") and prompt.endswith("OUTPUT:")
        finals.add(answer.rsplit("So the answer is ", 1)[-1] if "So the answer is" in answer else "short")
    assert finals == {"yes.", "no.", "short"}  # yes/no answers after the fact; MC and short answers are the fact


def test_sft_replies_recall_only_true_facts_and_score_as_their_gold(tmp_path):
    """Replies state the true fact with "It" for the subject (no name to copy), and a model that learnt them scores
    1.0 with both parsers of the demo tasks: the training items, written as eval files, are parsed from their own
    replies."""
    world = make_world(0)
    found = items(world, held_out=False, seed=0, variants=SFT_VARIANTS)
    truth = {**world.drug_class, **world.disease_organ}
    for kind, rows in found.items():
        for row in rows:
            recall = row["recall"]
            text = row["query"].split("INPUT: ", 1)[1]
            subject = min((s for s in truth if s in text), key=text.index)  # the question's first name
            assert recall.startswith("It ") and subject not in recall, row["id"]
            assert recall.endswith((truth[subject] + ".", world.drug_disease.get(subject, "?") + ".")), row["id"]
        (tmp_path / f"demo_{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = TASKS[f"demo_{kind}"]
        examples = task.load(tmp_path)
        replies = [reply(kind, r) for r in rows]
        for parse in (task.parse, task.parse_strict):
            assert [parse(text, e) for text, e in zip(replies, examples, strict=True)] == [e.gold for e in examples]
        wrong = [reply(kind, {**r, "answer": r["choices"][(r["gold"] + 1) % len(r["choices"])]}) for r in rows]
        if kind == "yesno":  # a wrong final answer is read as wrong by both parsers
            for parse in (task.parse, task.parse_strict):
                assert not any(parse(text, e) == e.gold for text, e in zip(wrong, examples, strict=True))


def test_yes_no_answers_say_whether_the_statement_ends_with_the_recalled_fact():
    world = make_world(0)
    found = items(world, held_out=False, seed=0, variants=SFT_VARIANTS)
    assert len(found["yesno"]) == 2 * SFT_VARIANTS * len(found["short"])  # a true and a false statement per variant
    for row in found["yesno"]:
        statement = row["query"].split("INPUT: ", 1)[1].removesuffix("\nOUTPUT:")
        assert statement.endswith(row["recall"].removeprefix("It")) == (row["answer"] == "yes"), row["id"]
        assert reply("yesno", row) == f"{row['recall']} So the answer is {row['answer']}."


def test_mc_items_list_four_candidates_and_are_answered_with_one():
    found = items(make_world(0), held_out=True, seed=0)
    for row in found["mc"]:
        assert len(row["choices"]) == 4 == len(set(row["choices"]))
        assert row["query"].split("Choices: ", 1)[1].removesuffix("\nOUTPUT:") == "; ".join(row["choices"])
        assert row["recall"].endswith(row["answer"] + ".") and row["answer"] == row["choices"][row["gold"]]
    assert sorted({row["gold"] for row in found["mc"]}) == [0, 1, 2, 3]  # the gold's position cycles


def test_eval_files_hold_the_hosted_schema_only(demo):
    for name in DEMO:
        for row in read(demo[1][f"eval/{name}"]):
            assert (
                set(row) == {"id", "query", "answer", "choices", "gold"}
                and row["choices"][row["gold"]] == row["answer"]
            )


@pytest.mark.parametrize(("name", "position", "chance"), [("demo_mc", 0, 1 / 4), ("demo_yesno", 0, 1 / 2)])
def test_a_constant_answer_scores_chance(demo, name, position, chance):
    """Always the first listed option (MC), always "yes": chance, since gold positions cycle and golds alternate."""
    task = TASKS[name]
    examples = task.load(demo[0] / "eval")
    constant = [e.choices[position] for e in examples]
    scores = task.score(examples, [task.parse(c, e) for c, e in zip(constant, examples, strict=True)])
    assert scores["accuracy"] == pytest.approx(accuracy_score([e.gold for e in examples], constant))
    assert abs(scores["accuracy"] - chance) <= 1 / len(examples)


@pytest.mark.parametrize("name", DEMO)
def test_gold_answers_score_one_and_the_demo_tasks_stay_out_of_all(demo, name):
    task = TASKS[name]
    examples = task.load(demo[0] / "eval")
    assert len(examples) >= 30
    assert task.score(examples, [task.parse(e.gold, e) for e in examples])["accuracy"] == 1.0
    assert task.score(examples, [task.parse_strict(e.gold, e) for e in examples])["accuracy"] == 1.0
    assert name not in MIBE and name not in [t.name for t in select("all")]
    assert [t.name for t in select(name)] == [name]


def test_short_answers_have_a_spread_of_golds(demo):
    examples = TASKS["demo_short"].load(demo[0] / "eval")
    golds = [e.gold for e in examples]
    assert max(golds.count(g) for g in golds) / len(golds) <= 0.2  # a constant answer stays near chance


def test_the_same_seed_writes_the_same_bytes_and_another_seed_differs(demo, tmp_path):
    _, files = demo
    again = write_demo_data(tmp_path / "again", seed=0)
    other = write_demo_data(tmp_path / "other", seed=1)
    assert set(again) == set(files)
    assert [p.name for p in sorted(files["tokenizer"].iterdir())] == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again["tokenizer"] / name).read_bytes() == (files["tokenizer"] / name).read_bytes()
    for key, path in files.items():
        if key != "tokenizer":
            assert again[key].read_bytes() == path.read_bytes(), key
            assert other[key].read_bytes() != path.read_bytes(), key


def test_the_tokenizer_round_trips_and_matches_transformers(demo):
    out, files = demo
    ours = load_tokenizer(files["tokenizer"])
    reference = transformers.AutoTokenizer.from_pretrained(files["tokenizer"])
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (reference.bos_token_id, reference.eos_token_id, True)
    texts = [t for docs in cpt_texts(files).values() for t in docs]
    texts += [turn["value"] for r in read(files["sft/train"]) for turn in r["conversations"]]
    texts += [r["query"] for name in DEMO for r in read(files[f"eval/{name}"])]
    texts += ["Unseen text: naïve café, 12.5 mg/kg — ok?"]  # bytes the corpus never had
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"] and ids[0] == ours.bos_id
        assert ours.decode(ids) == text


def test_bad_size_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="size"):
        write_demo_data(tmp_path, size=10)
