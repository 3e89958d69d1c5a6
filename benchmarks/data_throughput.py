"""Input-pipeline throughput: CPT batches per second, on the fly and from prepared shards, against the train step.

It writes a synthetic JSONL corpus of clinical-style notes, then times, in one run:
1. `Mixture` batches from the raw JSONL, tokenized on the fly by LLaMA-2's SentencePiece model (one process);
2. `mellama prepare` of the same files (parallel worker processes);
3. `Mixture` batches from the prepared shards;
4. the jitted train step of tiny models on the same batch shape (what training consumes on this machine):
   LLaMA-2's vocabulary, and configs/tiny.yaml's 512 tokens (the demo, the hungriest consumer here).
Each figure is in tokens per second; nothing is asserted (BENCHMARKS.md has the numbers).

    python benchmarks/data_throughput.py --tokenizer ../shared/data/llama2_tokenizer.model --work /tmp/data-bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import time

import numpy as np

from mellama_jax.config import DataConfig, MeshConfig, ModelConfig, SourceConfig, TrainConfig
from mellama_jax.data.cpt import cpt_batches
from mellama_jax.data.prepare import prepare

WORDS = ["patient", "admitted", "with", "chest", "pain", "troponin", "elevated", "started", "on", "heparin",
         "aspirin", "echocardiogram", "shows", "ejection", "fraction", "of", "45%", "history", "diabetes",
         "hypertension", "discharged", "home", "follow-up", "cardiology", "in", "two", "weeks"]  # fmt: skip


def write_corpus(folder: pathlib.Path, files: int, notes: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for f in range(files):
        with open(folder / f"notes-{f}.jsonl", "w") as out:
            for _ in range(notes):
                out.write(json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(50, 600)))}) + "\n")


def batch_rate(cfg: TrainConfig, batches: int) -> float:
    """Tokens per second of `batches` batches of this config's data (one process)."""
    data = cpt_batches(cfg, 0, cfg.global_batch)
    start = time.perf_counter()
    for _ in range(batches):
        next(data)
    return batches * cfg.global_batch * cfg.seq_len / (time.perf_counter() - start)


def step_rate(cfg: TrainConfig, steps: int) -> float:
    import jax

    from mellama_jax.data.synthetic import CountingBatches
    from mellama_jax.model.sharding import make_mesh
    from mellama_jax.training.step import compile_step, init_state

    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    state, step = init_state(cfg, mesh), compile_step(cfg, mesh)
    batch = next(CountingBatches(cfg.model.vocab_size, cfg.seq_len, cfg.global_batch))
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return steps * cfg.global_batch * cfg.seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--work", type=pathlib.Path, required=True)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--notes", type=int, default=1500, help="per file")
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    write_corpus(args.work / "raw", args.files, args.notes)
    model = ModelConfig.tiny(vocab_size=32000)
    raw = SourceConfig(name="notes", paths=(str(args.work / "raw"),))
    cfg = TrainConfig(model=model, seq_len=128, global_batch=8, micro_batches=1, mesh=MeshConfig(fsdp=1),
                      data=DataConfig(kind="cpt", sources=(raw,), tokenizer=args.tokenizer))  # fmt: skip
    on_the_fly = batch_rate(cfg, args.batches)
    start = time.perf_counter()
    manifest = prepare([str(args.work / "raw")], args.tokenizer, args.work / "prepared")
    prepare_rate = manifest["tokens"] / (time.perf_counter() - start)
    prepared = dataclasses.replace(raw, paths=(str(args.work / "prepared"),), format="prepared")
    from_shards = batch_rate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=(prepared,))), 400)
    demo = dataclasses.replace(cfg, model=ModelConfig.tiny(vocab_size=512))  # configs/tiny.yaml's model
    train, train_demo = step_rate(cfg, 20), step_rate(demo, 50)
    print(f"corpus: {manifest['documents']} notes, {manifest['tokens']} tokens; {os.cpu_count()} cores")
    print("| what | tokens/s | × what configs/tiny.yaml's step consumes |\n|---|---|---|")
    for what, rate in [("batches, raw JSONL tokenized on the fly (1 process)", on_the_fly),
                       (f"mellama prepare ({min(args.files, os.cpu_count())} workers)", prepare_rate),
                       ("batches from prepared shards (1 process)", from_shards),
                       ("train step, tiny model (d 64, 2 layers, V 32000), 8 × 128", train),
                       ("train step, configs/tiny.yaml (V 512), 8 × 128", train_demo)]:  # fmt: skip
        print(f"| {what} | {rate:,.0f} | {rate / train_demo:.1f} |")


if __name__ == "__main__":
    main()
