"""The demo's train steps on CPU: its former settings against each change alone and against its settings now.

`mellama demo` spends nearly all of its minutes in two training stages. This times their jitted steps on the
demo's model shape (vocabulary 1024, d 128, ffn 384, fp32) with random token rows, one document per row,
for each variant below, each in its own child process, alternating variants for `--rounds` rounds;
a round is `--steps` steps after `--warmup` untimed ones (compilation included there). Reported: the
median step time, tokens/s, and the ratio of tokens/s to the former settings of the same stage. Nothing is
asserted: the figures go to BENCHMARKS.md.

    python benchmarks/demo_step.py
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

# stage -> variant -> (layers, heads, remat, rows, row length, LoRA)
VARIANTS = {
    "cpt": {
        "former (4 layers, 4 heads, no remat, 16 x 256)": (4, 4, "none", 16, 256, False),
        "2 heads of 64": (4, 2, "none", 16, 256, False),
        "remat full": (4, 4, "full", 16, 256, False),
        "rows of 128 (32 x 128)": (4, 4, "none", 32, 128, False),
        "3 layers": (3, 4, "none", 16, 256, False),
        "now (all four)": (3, 2, "full", 32, 128, False),
    },
    "sft": {
        "former (4 layers, 4 heads, no remat, 16 x 256)": (4, 4, "none", 16, 256, True),
        "now (3 layers, 2 heads, remat full, 8 x 256)": (3, 2, "full", 8, 256, True),
    },
}


def ours(args) -> list[float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mellama_jax.config import LoraConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
    from mellama_jax.model.sharding import make_mesh
    from mellama_jax.training.step import compile_step, init_state

    layers, heads, remat, rows, length, lora = VARIANTS[args.stage][args.variant]
    model = ModelConfig.tiny(vocab_size=1024, d_model=128, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                             head_dim=128 // heads, ffn_dim=384, max_seq_len=256, remat=remat)  # fmt: skip
    cfg = TrainConfig(
        model=model, seq_len=length, global_batch=rows, micro_batches=1, steps=10**6, mesh=MeshConfig(fsdp=1),
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.0), lora=LoraConfig(rank=16, alpha=32.0) if lora else None,
    )  # fmt: skip
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    state, step = init_state(cfg, mesh), compile_step(cfg, mesh)
    tokens = np.random.default_rng(0).integers(3, 1024, (rows, length), dtype=np.int32)
    ones = np.ones_like(tokens)
    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(length), tokens.shape), "segment_ids": ones}
    batch = {k: jnp.asarray(v) for k, v in {**batch, "loss_mask": ones}.items()}
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def child(stage: str, variant: str) -> list[float]:
    argv = [sys.executable, __file__, "--stage", stage, "--variant", variant, *sys.argv[1:]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stage", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(ours(args)))
        return
    times = {(stage, v): [] for stage, variants in VARIANTS.items() for v in variants}
    for _ in range(args.rounds):
        for stage, variant in times:
            times[stage, variant] += child(stage, variant)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; demo shape, fp32, AdamW (LoRA r16 for sft)")
    print("| stage | variant | median step s | tokens/s | vs former |\n|---|---|---:|---:|---:|")
    for stage, variants in VARIANTS.items():
        rate = {v: variants[v][3] * variants[v][4] / statistics.median(times[stage, v]) for v in variants}
        former = next(iter(rate.values()))
        for v in variants:
            median = statistics.median(times[stage, v])
            print(f"| {stage} | {v} | {median:.3f} | {rate[v]:.0f} | {rate[v] / former:.2f}x |")


if __name__ == "__main__":
    main()
