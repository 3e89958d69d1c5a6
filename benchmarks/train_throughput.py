"""Train-step throughput on CPU: our jitted step against `transformers` + torch on the same shape, one run.

Both sides train the same LLaMA shape in fp32 with AdamW (β 0.9/0.95, wd 1e-5, clip 1.0) on the same
random token rows, one document per row, with the same number of threads. Each side is timed in its own
child process (so neither's thread pool disturbs the other), alternating ours/torch for `--rounds`
rounds; a round is `--steps` steps after `--warmup` untimed ones (compilation included there). The
median step time of each side gives tokens/s; the ratio is ours / torch. Nothing is asserted: the
figures go to BENCHMARKS.md.

    python benchmarks/train_throughput.py            # the issue's shape: V 32000, d 512, 8 layers, 8 x 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SHAPE = {"vocab_size": 32000, "d_model": 512, "ffn_dim": 1376, "n_layers": 8, "n_heads": 8}


def random_rows(batch: int, seq_len: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, (batch, seq_len), dtype=np.int32)


def ours(args) -> list[float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mellama_jax.config import MeshConfig, ModelConfig, OptimConfig, TrainConfig
    from mellama_jax.model.sharding import make_mesh
    from mellama_jax.training.step import compile_step, init_state

    model = ModelConfig(
        **SHAPE, n_kv_heads=SHAPE["n_heads"], head_dim=SHAPE["d_model"] // SHAPE["n_heads"],
        max_seq_len=args.seq_len, dtype="float32", param_dtype="float32", remat=args.remat,
    )  # fmt: skip
    cfg = TrainConfig(
        model=model, seq_len=args.seq_len, global_batch=args.batch, micro_batches=1, steps=10**6,
        optim=OptimConfig(lr=1e-4, warmup_ratio=0.0), mesh=MeshConfig(fsdp=1),
    )  # fmt: skip
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    state, step = init_state(cfg, mesh), compile_step(cfg, mesh)
    tokens = random_rows(args.batch, args.seq_len, SHAPE["vocab_size"])
    ones = np.ones_like(tokens)
    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(args.seq_len), tokens.shape), "segment_ids": ones}
    batch = {k: jnp.asarray(v) for k, v in {**batch, "loss_mask": ones}.items()}
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def torch_side(args) -> list[float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["d_model"], intermediate_size=SHAPE["ffn_dim"],
        num_hidden_layers=SHAPE["n_layers"], num_attention_heads=SHAPE["n_heads"], max_position_embeddings=args.seq_len,
        attn_implementation="sdpa", tie_word_embeddings=False, torch_dtype=torch.float32,
    )  # fmt: skip
    model = LlamaForCausalLM(config).train()
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-5)
    tokens = torch.from_numpy(random_rows(args.batch, args.seq_len, SHAPE["vocab_size"])).long()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def child(side: str, args) -> list[float]:
    """One side's step times, from a fresh process limited to `--threads` threads."""
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    argv = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--remat", default="none", help="ours: remat policy; torch: gradient checkpointing if not none")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--side", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(ours(args) if args.side == "ours" else torch_side(args)))
        return
    times = {"ours": [], "torch": []}
    for _ in range(args.rounds):
        for side in times:
            times[side] += child(side, args)
    tokens = args.batch * args.seq_len
    rate = {side: tokens / statistics.median(t) for side, t in times.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.threads} threads; shape {SHAPE}")
    print(f"batch {args.batch} x {args.seq_len} tokens, fp32, AdamW, remat {args.remat}")
    print("| side | median step s | tokens/s |\n|---|---|---|")
    for side, t in times.items():
        print(f"| {side} | {statistics.median(t):.3f} | {rate[side]:.0f} |")
    print(f"ratio ours / torch: {rate['ours'] / rate['torch']:.2f}x")


if __name__ == "__main__":
    main()
