"""Validation during training: held-out splits never trained on, val_loss against transformers, the logs, resume."""

import collections
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mellama_jax.checkpoint import restore_params
from mellama_jax.cli import main
from mellama_jax.config import DataConfig, ModelConfig, SourceConfig, TrainConfig
from mellama_jax.config_file import load_config
from mellama_jax.data.cpt import Mixture, Stream, cpt_batches
from mellama_jax.data.packing import held_out
from mellama_jax.data.sft import encode, sft_batches, turns
from mellama_jax.data.tokenizer import load_tokenizer
from mellama_jax.errors import UserError
from mellama_jax.hf.config import hf_config
from mellama_jax.model.sharding import make_mesh
from mellama_jax.training import loop
from mellama_jax.training.metrics_log import MetricsLog
from mellama_jax.training.step import init_state
from mellama_jax.training.validation import Evaluator, eval_batches

WORDS = np.asarray(["patient", "given", "insulin", "metformin", "for", "diabetes", "control", "chest", "pain", "after"])
MODEL = ModelConfig.tiny(vocab_size=32000, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)
BOS, EOS = 1, 2  # LLaMA-2's


def notes(n: int, seed: int = 0) -> list[str]:
    """n distinct random notes of 5-60 words (distinct, so a document is known by its tokens)."""
    rng = np.random.default_rng(seed)
    texts = list(dict.fromkeys(" ".join(rng.choice(WORDS, rng.integers(5, 60))) for _ in range(n + 20)))
    return texts[:n]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_path(shared_data):
    return str(shared_data / "llama2_tokenizer.model")


def cpt_config(tmp_path, tokenizer_path, n=300, seq_len=64, global_batch=4, **data) -> TrainConfig:
    corpus = write_jsonl(tmp_path / "notes.jsonl", [{"text": t} for t in notes(n)])
    source = SourceConfig(name="notes", paths=(corpus,))
    data = DataConfig(kind="cpt", sources=(source,), tokenizer=tokenizer_path, **data)
    return TrainConfig(model=MODEL, seq_len=seq_len, global_batch=global_batch, micro_batches=1, data=data)


def documents(batches) -> list[tuple[int, ...]]:
    """The documents of one process's packed rows, put back together: rows are filled in order and a document
    cut at a row's end goes on at the next row's start, so the real tokens read row by row are BOS doc EOS ..."""
    flat = np.concatenate([b["tokens"][b["segment_ids"] != 0] for b in batches])
    starts = np.flatnonzero(flat == BOS)
    docs = [flat[a:b] for a, b in zip(starts, [*starts[1:], len(flat)], strict=True)]
    assert all(d[-1] == EOS for d in docs)
    return [tuple(d[1:-1].tolist()) for d in docs]


def test_the_cpt_held_out_share_is_never_trained_on_and_is_what_validation_reads(tmp_path, tokenizer_path):
    cfg = cpt_config(tmp_path, tokenizer_path, heldout=0.2, epochs=1)
    tokenizer = load_tokenizer(tokenizer_path)
    every = collections.Counter(tuple(tokenizer.encode(t, add_special=False)) for t in notes(300))
    assert len(every) == 300  # documents are told apart by their tokens
    trained = collections.Counter(documents(cpt_batches(cfg, 0, 4)))
    held = collections.Counter(documents(cpt_batches(cfg, 0, 4, evaluation=True)))
    assert not trained.keys() & held.keys() and trained + held == every  # disjoint, each document once
    assert abs(sum(held.values()) - 0.2 * 300) <= 4 * math.sqrt(300 * 0.2 * 0.8)  # binomial, 4 sigma
    # two data shards (two processes): training still never sees them, and validation reads the same documents
    shards = [(0, 2), (2, 2)]
    trained_2 = sum((collections.Counter(documents(cpt_batches(cfg, *s))) for s in shards), collections.Counter())
    held_2 = sum((collections.Counter(documents(cpt_batches(cfg, *s, evaluation=True))) for s in shards),
                 collections.Counter())  # fmt: skip
    assert held_2 == held and trained_2 == trained
    # nor does the run's seed change what is held out, or the order validation reads it in
    reseeded = dataclasses.replace(cfg, seed=7)
    assert collections.Counter(documents(cpt_batches(reseeded, 0, 4))) == trained
    a, b = next(cpt_batches(cfg, 0, 4, evaluation=True)), next(cpt_batches(reseeded, 0, 4, evaluation=True))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def tokens_of(batches) -> set[int]:
    return {int(t) for b in batches for t in b["tokens"][b["segment_ids"] != 0]} - {BOS, EOS}


def test_training_over_many_epochs_never_meets_a_held_out_document():
    docs = [np.arange(10 + 100 * i, 11 + 100 * i + i % 50) for i in range(120)]  # tokens tell the document
    stream = lambda: Stream("s", len(docs), lambda i: docs[i], BOS, EOS, seed=3, heldout=0.3)  # noqa: E731
    held = set()
    for shard in (0, 1):
        part = stream().held_out_part().split(shard, 2, empty_ok=True)
        held |= tokens_of(Mixture([part], [1.0], seq_len=32, rows=2, window=64, once=True))
    picked = np.flatnonzero(held_out(np.arange(len(docs)), 0.3))
    assert held == {int(t) for i in picked for t in docs[i]} and 20 < len(picked) < 50
    kept = {int(t) for i in set(range(len(docs))) - set(picked) for t in docs[i]}
    for shard in (0, 1):  # no epoch limit: ~20 epochs, each shard's share of the documents drawn anew in each
        mixture = Mixture([stream().split(shard, 2)], [1.0], seq_len=32, rows=2, window=64)
        assert tokens_of(next(mixture) for _ in range(300)) == kept  # every kept document, and nothing else


def test_a_shard_whose_every_document_is_held_out_is_an_error_not_a_hang():
    assert held_out(0, 0.999)[0]  # the only document is held out
    mixture = Mixture([Stream("tiny", 1, lambda i: np.arange(5, 9), BOS, EOS, seed=0, heldout=0.999)], [1.0], 16, 2, 16)
    with pytest.raises(UserError, match=r"source tiny: every record of this shard is malformed or held out"):
        next(mixture)


def test_the_sft_held_out_share_is_never_trained_on(tmp_path, tokenizer_path):
    records = [{"instruction": f"Note {i}: {t}", "output": t.split()[0]} for i, t in enumerate(notes(200, seed=1))]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    data = DataConfig(kind="sft", sources=(SourceConfig(name="qa", paths=(path,)),), tokenizer=tokenizer_path,
                      epochs=1, heldout=0.25)  # fmt: skip
    cfg = TrainConfig(model=MODEL, seq_len=128, global_batch=4, micro_batches=1, data=data)
    tokenizer = load_tokenizer(tokenizer_path)
    every = collections.Counter(tuple(encode(turns(r, "x"), "me-llama", tokenizer)[0]) for r in records)

    def samples(batches) -> collections.Counter:  # a sample is one segment of a row
        found = collections.Counter()
        for b in batches:
            for row, segments in zip(b["tokens"], b["segment_ids"], strict=True):
                found.update(tuple(row[segments == s].tolist()) for s in range(1, segments.max() + 1))
        return found

    trained, held = samples(sft_batches(cfg, 0, 4)), samples(sft_batches(cfg, 0, 4, evaluation=True))
    assert not trained.keys() & held.keys() and trained + held == every and len(every) == 200
    assert abs(sum(held.values()) - 50) <= 4 * math.sqrt(200 * 0.25 * 0.75)
    both = samples(sft_batches(cfg, 0, 2, evaluation=True)) + samples(sft_batches(cfg, 2, 2, evaluation=True))
    assert both == held


def exchange(failure, *flags):  # one process: nothing to agree on
    if failure is not None:
        raise failure
    return flags


def test_every_evaluation_reads_the_same_bounded_batches(tmp_path, tokenizer_path):
    cfg = dataclasses.replace(cpt_config(tmp_path, tokenizer_path, n=200, heldout=0.5), eval_every=1)
    mesh = make_mesh(cfg.mesh, jax.devices()[:4])
    params = init_state(cfg, mesh).params
    whole = Evaluator(cfg, mesh)
    first = whole(3, params, exchange)
    assert whole(3, params, exchange) == first  # rewound: the same batches, the same sums
    bounded = Evaluator(dataclasses.replace(cfg, eval_batches=2), mesh)(3, params, exchange)
    batches = list(eval_batches(cfg, 0, cfg.global_batch))
    assert len(batches) > 2
    assert bounded["val_tokens"] == sum(targets(b) for b in batches[:2])
    assert first["val_tokens"] == sum(targets(b) for b in batches)
    assert first["val_ppl"] == pytest.approx(math.exp(first["val_loss"]), rel=1e-12)


def test_errors_in_the_eval_data_name_eval_data_not_data(tmp_path, tokenizer_path):
    folder = tmp_path / "data.kind"  # a path that reads like a data field stays as it is
    folder.mkdir()
    held = write_jsonl(folder / "held.jsonl", [{"text": "aspirin for fever"}, {"note": "no text field"}])
    cfg = dataclasses.replace(
        cpt_config(tmp_path, tokenizer_path), eval_every=1,
        eval_data=DataConfig(kind="cpt", sources=(SourceConfig(name="held", paths=(held,)),)),
    )  # fmt: skip
    evaluator = Evaluator(cfg, make_mesh(cfg.mesh, jax.devices()[:4]))
    with pytest.raises(UserError) as raised:
        evaluator(0, init_state(cfg, make_mesh(cfg.mesh, jax.devices()[:4])).params, exchange)
    assert str(raised.value) == f"{held}:2: no 'text' field (set eval_data.on_error: skip to skip such records)"
    raw = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=""))  # and the tokenizer it lacks
    with pytest.raises(UserError, match=r"^eval_data.tokenizer: source held is raw text; name a tokenizer"):
        eval_batches(raw, 0, 4)


def targets(batch) -> int:
    """Target tokens of a CPT batch: every next token of the same segment (none across a row's end)."""
    segments = batch["segment_ids"]
    return int(((segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)).sum())


def reference_loss(cfg: TrainConfig, params: dict, batches: list[dict]) -> tuple[float, int]:
    """Token-weighted cross-entropy of transformers' LlamaForCausalLM with our weights, document piece by piece:
    each segment of a row is its own sequence, at its own positions (float32 logits, float64 sums)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mellama_jax.hf.table import params_to_hf

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(cfg.model), attn_implementation="eager"))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params_to_hf(params, cfg.model).items()})
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            for row in range(len(b["tokens"])):
                for s in range(1, b["segment_ids"][row].max() + 1):
                    where = b["segment_ids"][row] == s
                    tokens, positions = b["tokens"][row][where], b["positions"][row][where]
                    logits = model(torch.tensor(tokens[None]), position_ids=torch.tensor(positions[None])).logits[0]
                    logp = torch.log_softmax(logits.double(), -1)[:-1]
                    picked = logp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
                    keep = torch.tensor(b["loss_mask"][row][where][1:] != 0)
                    total, count = total - float(picked[keep].sum()), count + int(keep.sum())
    return total / count, count


RUN = """
model: {{preset: tiny, vocab_size: 32000, d_model: 32, n_heads: 4, n_kv_heads: 2, head_dim: 8, ffn_dim: 64}}
seq_len: 64
global_batch: 16
micro_batches: 2
steps: {steps}
checkpoint_every: 2
keep_checkpoints: 5
eval_every: 2
optim: {{lr: 1.0e-2, warmup_ratio: 0.0}}
data: {{kind: cpt, heldout: 0.1, tokenizer: {tokenizer}, sources: [{{name: notes, paths: [{corpus}]}}]}}
"""


def rows_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tokenizer_path):
    """A 5-step CPT run validating every 2 steps: the config file, run folder and its metrics rows."""
    folder = tmp_path_factory.mktemp("straight")
    corpus = write_jsonl(folder / "notes.jsonl", [{"text": t} for t in notes(400)])
    (folder / "run.yaml").write_text(RUN.format(steps=5, tokenizer=tokenizer_path, corpus=corpus))
    assert main(["train", "--config", str(folder / "run.yaml"), f"run_dir={folder / 'run'}"]) == 0
    return folder, rows_of(folder / "run")


def test_a_run_with_eval_every_logs_validation_loss(straight):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    folder, rows = straight
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]  # the start, every 2 steps, the end
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in rows] == [0, 1, 2, 2, 3, 4, 4, 5, 5]  # a validation follows its step
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learns, and it shows on unseen documents
    assert len({r["val_tokens"] for r in evals}) == 1  # the same batches every time
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
    (events,) = (folder / "run" / "tensorboard").iterdir()
    reader = event_accumulator.EventAccumulator(str(events))
    reader.Reload()
    assert [s.step for s in reader.Scalars("val/loss")] == [0, 2, 4, 5]
    logged = [s.value for s in reader.Scalars("val/loss")]
    np.testing.assert_allclose(logged, [r["val_loss"] for r in evals], rtol=1e-6)  # TensorBoard keeps float32
    assert [s.value for s in reader.Scalars("val/tokens")] == [r["val_tokens"] for r in evals]
    assert [s.step for s in reader.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert (folder / "run" / "loss.png").stat().st_size > 10_000


def test_val_loss_equals_transformers_on_the_same_weights_and_batches(straight):
    folder, rows = straight
    cfg = load_config(str(folder / "run.yaml"), [f"run_dir={folder / 'run'}"])
    batches = list(eval_batches(cfg, 0, cfg.global_batch))  # one process: every row
    for step in (2, 5):
        params = restore_params(folder / "run" / "checkpoints" / str(step) / "state")["params"]
        loss, count = reference_loss(cfg, params, batches)
        (row,) = [r for r in rows if r["step"] == step and "val_loss" in r]
        assert row["val_tokens"] == count
        assert row["val_loss"] == pytest.approx(loss, rel=1e-6)  # fp32 logits on both sides; seen: 1e-7


def test_a_resumed_run_neither_loses_nor_repeats_validation_rows(straight, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    folder, rows = straight
    shutil.copytree(folder / "run", tmp_path / "run")
    config = ["--config", str(folder / "run.yaml"), f"run_dir={tmp_path / 'run'}"]
    for step in (4, 5):  # lost: steps 3 to 5 and their validations are redone from checkpoint 2
        shutil.rmtree(tmp_path / "run" / "checkpoints" / str(step))
    assert main(["train", *config]) == 0
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert untimed(rows_of(tmp_path / "run")) == untimed(rows)  # the same rows, validations included, to the bit
    (events,) = (tmp_path / "run" / "tensorboard").iterdir()
    reader = event_accumulator.EventAccumulator(str(events))
    reader.Reload()
    assert [s.step for s in reader.Scalars("val/loss")] == [0, 2, 4, 5]  # the redone ones once each
    # A SIGTERM at a due step saves it without validating (the grace time is for the save): the resumed run
    # validates it first. Here: the row of step 4 gone, as if the run had stopped so there.
    rows_4 = [r for r in rows if r["step"] <= 4]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_4[:-1]))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "5")
    assert main(["train", *config, "steps=6"]) == 0
    again = rows_of(tmp_path / "run")
    assert [(r["step"], "val_loss" in r) for r in again] == [
        (0, True), (1, False), (2, False), (2, True), (3, False), (4, False), (4, True), (5, False), (6, False),
        (6, True),
    ]  # fmt: skip
    assert again[6] == rows_4[-1]  # step 4's validation, done at the restart, is the one the straight run logged


def test_a_resume_that_validates_on_another_set_says_so_and_keeps_the_earlier_rows_apart(straight, tmp_path, capsys):
    folder, rows = straight
    shutil.copytree(folder / "run", tmp_path / "run")
    for step in (4, 5):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / str(step))
    assert main(["train", "--config", str(folder / "run.yaml"), f"run_dir={tmp_path / 'run'}", "eval_batches=1"]) == 0
    assert (
        "WARNING: validation: the eval data or its batching (eval_data, data.heldout, eval_batches, global_batch,"
        " seq_len) changed since step 2's validation: val_loss from here on does not compare" in capsys.readouterr().err
    )
    evals = [r for r in rows_of(tmp_path / "run") if "val_loss" in r]
    assert evals[:2] == [r for r in rows if "val_loss" in r][:2]  # kept as they were
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert len({r["val_set"] for r in evals[:2]}) == len({r["val_set"] for r in evals[2:]}) == 1
    assert evals[1]["val_set"] != evals[2]["val_set"] and evals[2]["val_tokens"] < evals[1]["val_tokens"]


def test_an_event_file_a_kill_left_empty_still_drops_the_redone_steps(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"")  # killed before its first flush
    row = lambda step: {"step": step, "loss": float(step), "lr": 0.1}  # noqa: E731
    for start, steps in ((0, (1, 2)), (1, (2, 3))):  # killed after step 2, resumed from step 1's checkpoint
        metrics = MetricsLog(tmp_path, start)
        for step in steps:
            metrics.write(row(step))
        metrics.events.close()  # as a kill leaves it: no plot
    reader = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    reader.Reload()
    assert [s.step for s in reader.Scalars("train/loss")] == [1, 2, 3]  # was [1, 2, 2, 3]


@pytest.mark.slow
def test_a_signal_during_a_validation_cuts_it_short_and_the_resumed_run_does_it(straight, tmp_path, monkeypatch):
    folder, rows = straight
    config = ["--config", str(folder / "run.yaml"), f"run_dir={tmp_path / 'run'}"]

    class SignalledAt2(loop.Evaluator):  # SIGTERM (as from a scheduler) arrives while step 2 is evaluated
        def __call__(self, step, *args):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(step, *args)

    monkeypatch.setattr(loop, "Evaluator", SignalledAt2)
    assert main(["train", *config]) == 0
    assert max(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == 2  # saved there, at once
    assert [(r["step"], "val_loss" in r) for r in rows_of(tmp_path / "run")] == [(0, True), (1, False), (2, False)]
    monkeypatch.undo()
    assert main(["train", *config]) == 0
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert untimed(rows_of(tmp_path / "run")) == untimed(rows)  # step 2 validated first, then as the straight run


TWO_PROCESSES = """
model: {{preset: tiny, vocab_size: 32000, d_model: 32, n_heads: 4, n_kv_heads: 2, head_dim: 8, ffn_dim: 64}}
seq_len: 32
global_batch: 8
micro_batches: 2
steps: 2
checkpoint_every: 2
eval_every: 2
optim: {{lr: 1.0e-2, warmup_ratio: 0.0}}
mesh: {{data: 1, fsdp: 2, tensor: 2}}
data: {{kind: cpt, tokenizer: {tokenizer}, sources: [{{name: notes, paths: [{corpus}]}}]}}
eval_data: {{kind: cpt, sources: [{{name: held, paths: [{held}]}}]}}
"""


def two_processes(tmp_path) -> list[tuple[int, str]]:
    """`mellama train` as 2 processes of 2 CPU devices each: their exit codes and stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "mellama_jax.cli", "train", "--config", str(tmp_path / "run.yaml")]
    argv += [f"run_dir={tmp_path / 'run'}", f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2"]
    processes = [subprocess.Popen([*argv, f"distributed.process_id={i}"], env=env, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]  # fmt: skip
    try:
        errors = [p.communicate(timeout=300)[1] for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        pytest.fail("one process waits forever for the other")
    return [(p.returncode, err) for p, err in zip(processes, errors, strict=True)]


@pytest.mark.slow
def test_two_processes_validate_their_own_rows_into_one_global_loss(tmp_path, tokenizer_path):
    corpus = write_jsonl(tmp_path / "notes.jsonl", [{"text": t} for t in notes(100)])
    long = " ".join(["patient reports chest pain after exercise"] * 40)  # rows of 32 tokens: one shard runs long
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": "aspirin for fever"}, {"text": long}])
    (tmp_path / "run.yaml").write_text(TWO_PROCESSES.format(tokenizer=tokenizer_path, corpus=corpus, held=held))
    for code, err in two_processes(tmp_path):
        assert code == 0, err[-3000:]
    evals = [r for r in rows_of(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    # the reference: each process's rows of every eval batch, a shard that ran short padded, one global batch
    cfg = load_config(str(tmp_path / "run.yaml"))
    shards = [list(eval_batches(cfg, first_row, 4)) for first_row in (0, 4)]
    assert sorted(map(len, shards))[0] == 1 < sorted(map(len, shards))[1]  # one document each: 1 batch, and more
    padding = {k: np.zeros((4, 32), np.int32) for k in shards[0][0]}
    batches = [
        {k: np.concatenate([s[i][k] if i < len(s) else padding[k] for s in shards]) for k in padding}
        for i in range(max(map(len, shards)))
    ]
    params = restore_params(tmp_path / "run" / "checkpoints" / "2" / "state")["params"]
    loss, count = reference_loss(cfg, params, batches)
    assert evals[1]["val_tokens"] == count and evals[1]["val_loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.slow
def test_a_bad_eval_record_in_one_process_shard_stops_both(tmp_path, tokenizer_path):
    corpus = write_jsonl(tmp_path / "notes.jsonl", [{"text": t} for t in notes(100)])
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "aspirin for fever"}) + "\n" + '{"text": "cut off\n')  # one each; one bad
    (tmp_path / "run.yaml").write_text(TWO_PROCESSES.format(tokenizer=tokenizer_path, corpus=corpus, held=held))
    results = two_processes(tmp_path)
    assert [code for code, _ in results] == [2, 2]
    assert any("held.jsonl:2: invalid JSON" in err for _, err in results)
    assert any("another process stopped the run" in err for _, err in results)


def test_a_lora_run_validates_with_its_adapters(tmp_path, tokenizer_path):
    """The base is frozen under LoRA: validation losses that move can only come from the adapters."""
    corpus = write_jsonl(tmp_path / "notes.jsonl", [{"text": t} for t in notes(400)])
    (tmp_path / "run.yaml").write_text(RUN.format(steps=4, tokenizer=tokenizer_path, corpus=corpus))
    argv = ["train", "--config", str(tmp_path / "run.yaml"), f"run_dir={tmp_path / 'run'}", "lora.rank=4"]
    assert main(argv) == 0
    evals = [r["val_loss"] for r in rows_of(tmp_path / "run") if "val_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.05  # steps 0, 2 and 4
