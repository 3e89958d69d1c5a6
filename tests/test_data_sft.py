"""SFT samples with LLaMA-2's tokenizer: the loss covers exactly the answers, prompts are cut, never answers."""

import json
import logging

import numpy as np
import pytest

from mellama_jax.cli import main
from mellama_jax.data.sft import TEMPLATES, Samples, SFTBatches
from mellama_jax.data.sources import open_documents
from mellama_jax.data.tokenizer import load_tokenizer
from mellama_jax.errors import UserError


def turn(speaker, value):
    return {"from": speaker, "value": value}


RECORDS = [
    {"id": "qa1", "conversations": [turn("human", "What is the first-line drug for type 2 diabetes?"),
                                    turn("agent", "Metformin, unless contraindicated.")]},
    {"conversations": [turn("human", "Define tachycardia."), turn("agent", "A heart rate above 100/min."),
                       turn("human", "And bradycardia?"), turn("agent", "Below 60 beats per minute.")]},
    {"instruction": "Summarize the note.", "input": "Pt admitted with CAP, treated with ceftriaxone.",
     "output": "Pneumonia, treated."},
    {"instruction": "Name a loop diuretic.", "output": "Furosemide."},
]  # fmt: skip
ANSWERS = sorted(t["value"] for r in RECORDS[:2] for t in r["conversations"] if t["from"] == "agent") + sorted(
    r["output"] for r in RECORDS[2:]
)


@pytest.fixture
def tokenizer(shared_data):
    return load_tokenizer(shared_data / "llama2_tokenizer.model")


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def batches(tmp_path, tokenizer, template, records=RECORDS, seq_len=96, rows=2):
    docs = open_documents("sft", [str(write(tmp_path / "sft.jsonl", records))], "", "", "raise")
    return SFTBatches(Samples([docs], template, tokenizer, seq_len), seq_len, rows, seed=0, shard=0, shards=1, epochs=1)


def segments(batch):
    for row in range(len(batch["tokens"])):
        for segment in range(1, batch["segment_ids"][row].max() + 1):
            where = batch["segment_ids"][row] == segment
            yield batch["tokens"][row][where], batch["loss_mask"][row][where], batch["positions"][row][where]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_the_loss_mask_covers_exactly_the_answers(tmp_path, tokenizer, template):
    answers, prompts = [], []
    for batch in batches(tmp_path, tokenizer, template):
        for tokens, mask, positions in segments(batch):
            assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id  # whole samples, never split
            np.testing.assert_array_equal(positions, np.arange(len(tokens)))
            runs = np.split(np.arange(len(tokens)), np.flatnonzero(np.diff(mask)) + 1)
            for run in runs:
                if mask[run[0]]:
                    assert tokens[run[-1]] == tokenizer.eos_id
                    answers.append(tokenizer.decode(tokens[run[:-1]].tolist()))
                else:
                    prompts.append(tokenizer.decode([t for t in tokens[run].tolist() if t != tokenizer.bos_id]))
    assert sorted(answers[:]) == sorted(ANSWERS)
    expected = TEMPLATES[template][0].format(prompt="Name a loop diuretic.")
    assert expected.strip() in [p.strip() for p in prompts]


def test_an_over_long_prompt_is_cut_from_the_left_and_an_over_long_answer_skips_the_sample(tmp_path, tokenizer, caplog):
    long_prompt = " ".join(f"finding{i}" for i in range(200)) + " What is the diagnosis?"
    records = [
        {"instruction": long_prompt, "output": "Sepsis."},
        {"instruction": "Short.", "output": " ".join(["word"] * 200)},
        RECORDS[3],
    ]
    data = batches(tmp_path, tokenizer, "me-llama", records, seq_len=64, rows=1)
    with caplog.at_level(logging.WARNING, logger="mellama_jax"):
        samples = [(tokens, mask) for batch in data for tokens, mask, _ in segments(batch)]
    assert "sft.jsonl:1 longer than seq_len 64: cut its prompt from the left" in caplog.text
    assert "sft.jsonl:2 longer than seq_len 64: skipped it" in caplog.text and "finding1" not in caplog.text
    assert data.get_state()["truncated"] == 1 and data.get_state()["too_long"] == 1 and len(samples) == 2
    cut = next(tokens for tokens, mask in samples if tokenizer.decode(tokens[mask == 1][:-1].tolist()) == "Sepsis.")
    assert len(cut) == 64 and tokenizer.decode(cut.tolist()).rstrip().endswith(
        "What is the diagnosis?\n\nAssistant: \n Sepsis.".rstrip()
    )


def test_restored_state_gives_identical_next_batches(tmp_path, tokenizer):
    first = batches(tmp_path, tokenizer, "llama2-chat", RECORDS * 5, seq_len=64, rows=1)
    next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(3)]
    second = batches(tmp_path, tokenizer, "llama2-chat", RECORDS * 5, seq_len=64, rows=1)
    second.set_state(state)
    for a, b in zip(expected, [next(second) for _ in range(3)], strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": [{"from": "agent", "value": "x"}, {"from": "human", "value": "y"}]}, r"turn 1 must be"),
        (
            {"conversations": [{"from": "human", "value": "x"}]},
            r"'conversations' must be a non-empty list of human/agent turn pairs",
        ),
        ({"question": "x", "answer": "y"}, r"neither 'conversations' nor string 'instruction' and 'output'"),
        ({"instruction": "x", "input": 3, "output": "y"}, r"'input' must be a string"),
    ],
)
def test_malformed_sft_records_are_named_by_file_and_line(tmp_path, tokenizer, record, message):
    data = batches(tmp_path, tokenizer, "raw", [RECORDS[3], record])
    with pytest.raises(UserError, match=rf"sft\.jsonl:2: {message}"):
        list(data)


def test_sft_training_runs_from_the_config(tmp_path, shared_data):
    write(tmp_path / "sft.jsonl", RECORDS * 4)
    (tmp_path / "run.yaml").write_text(f"""
model: {{preset: tiny, vocab_size: 32000}}
seq_len: 96
global_batch: 8
micro_batches: 1
steps: 2
optim: {{lr: 1.0e-3}}
run_dir: {tmp_path / "run"}
data:
  kind: sft
  template: me-llama
  tokenizer: {shared_data / "llama2_tokenizer.model"}
  sources: [{{name: qa, paths: ["{tmp_path / "sft.jsonl"}"]}}]
""")
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and 0 < rows[0]["target_tokens"] < 8 * 96 / 2  # answers only
