"""Schedule vs data: how many steps the data covers, `steps: auto`, and what happens when one source ends."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from mellama_jax.config import DataConfig, ModelConfig, SourceConfig, TrainConfig
from mellama_jax.data.cpt import Mixture, Stream, cpt_batches, mixture_tokens
from mellama_jax.errors import UserError
from mellama_jax.training.loop import resolve_steps

BOS, EOS = 1, 2


def stream(docs, name) -> Stream:
    return Stream(name, len(docs), lambda i: np.asarray(docs[i]), BOS, EOS, seed=0)


def taken(mixture) -> list[int]:
    return [t for batch in mixture for t in batch["tokens"][batch["segment_ids"] != 0].tolist() if t > EOS]


def test_on_source_end_stop_ends_with_the_first_source_and_repeat_with_the_last():
    short = [[10], [11]]  # 3 tokens a document with BOS and EOS
    long = [list(range(20, 28)), list(range(30, 38))]  # 10 tokens a document
    # 1:1 by tokens. stop: a short (3), a long (10), the other short (6), then short would start epoch 2: the end.
    stop = Mixture([stream(short, "s"), stream(long, "l")], [1, 1], seq_len=8, rows=2, window=64, epochs=1)
    out = taken(stop)
    assert sorted(t for t in out if t < 20) == [10, 11]
    assert sorted(t for t in out if t >= 20) in ([*range(20, 28)], [*range(30, 38)])  # one long document only
    # repeat: short starts over (in its next epoch's order) while long finishes; long1 is read too, once.
    repeat = Mixture([stream(short, "s"), stream(long, "l")], [1, 1], 8, 2, 64, epochs=1, repeat=True)
    out = taken(repeat)
    assert sorted(t for t in out if t >= 20) == [*range(20, 28), *range(30, 38)]
    assert out.count(10) >= 2 and out.count(11) >= 2  # the short source was repeated


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, shared_data):
    from mellama_jax.data.prepare import prepare

    tmp, rng = tmp_path_factory.mktemp("corpora"), np.random.default_rng(0)
    words = np.asarray(["aspirin", "for", "fever", "patient", "reports", "chest", "pain", "resolved"])
    for name, n in (("big", 60), ("small", 12)):
        texts = [" ".join(rng.choice(words, rng.integers(5, 60))) for _ in range(n)]
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        prepare([str(tmp / f"{name}.jsonl")], str(shared_data / "llama2_tokenizer.model"), tmp / name, workers=1)
    return tmp


def config(corpora, on_source_end: str, steps=1000) -> TrainConfig:
    sources = tuple(SourceConfig(name=n, paths=(str(corpora / n),), format="prepared") for n in ("big", "small"))
    data = DataConfig(kind="cpt", sources=sources, epochs=1, on_source_end=on_source_end)
    return TrainConfig(model=ModelConfig.tiny(), seq_len=64, global_batch=2, micro_batches=1, steps=steps, data=data)


@pytest.mark.parametrize("on_source_end", ["stop", "repeat"])
def test_steps_auto_is_the_number_of_batches_the_data_really_gives(corpora, on_source_end):
    cfg = config(corpora, on_source_end, steps="auto")
    real = sum(1 for _ in cpt_batches(cfg, 0, cfg.global_batch))  # counted by running the mixture itself
    tokens = sum(int((b["segment_ids"] != 0).sum()) for b in cpt_batches(cfg, 0, cfg.global_batch))
    assert abs(mixture_tokens(cfg) - tokens) <= 2 * 61  # the end is known to within the document in hand
    assert abs(resolve_steps(cfg).steps - real) <= 1


def test_repeat_reads_more_of_the_data_than_stop(corpora):
    assert (
        resolve_steps(config(corpora, "repeat", "auto")).steps
        > 2 * resolve_steps(config(corpora, "stop", "auto")).steps
    )


def test_steps_that_disagree_with_the_data_are_warned_of(corpora, caplog):
    with caplog.at_level(logging.INFO, logger="mellama_jax"):
        covered = resolve_steps(config(corpora, "stop", steps="auto")).steps
        resolve_steps(config(corpora, "stop", steps=1000))
    assert f"the data covers {covered} steps" in caplog.text
    assert f"the data ends near step {covered} of 1000, where the learning rate is still" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mellama_jax"):
        resolve_steps(config(corpora, "stop", steps=covered))  # agrees: no warning
        assert not caplog.text
        resolve_steps(config(corpora, "stop", steps=max(1, covered // 2)))
    assert "of the data unread; set steps: auto" in caplog.text


def test_steps_auto_needs_data_of_known_size(corpora):
    cfg = config(corpora, "stop", steps="auto")
    for data in (DataConfig(), dataclasses.replace(cfg.data, epochs=0)):
        with pytest.raises(UserError, match="steps: auto needs a cpt mixture of prepared sources"):
            resolve_steps(dataclasses.replace(cfg, data=data))
    budget = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, epochs=0, token_budget=640))
    assert resolve_steps(budget).steps == 5  # 640 tokens at 2 x 64 per step
