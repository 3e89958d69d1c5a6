"""Train-step MFU and tokens/s per device: our step against `transformers` + torch on the same GPU, one run.

Both sides train the same LLaMA shape (default: a 1.1B LLaMA-2-style model, seq 4096) with bf16 compute,
fp32 master weights and AdamW (β 0.9/0.95, wd 1e-5, clip 1.0) on the same random token rows, one document
per row. Ours: the sharded step over every local device (fsdp), `model.attention` flash by default, remat
full. Torch: one device, bf16 autocast, SDPA attention (flash on GPU), gradient checkpointing. Each side
runs in its own child process, alternating for `--rounds` rounds of `--steps` timed steps after `--warmup`
untimed ones. MFU = model FLOPs (model.llama.train_flops_per_token, causal attention counted) × tokens/s over
the devices' dense bf16 peak. Nothing is asserted: the figures go to BENCHMARKS.md.

    python benchmarks/gpu_step.py                                   # on a GPU machine
    python benchmarks/gpu_step.py --shape tiny --seq-len 128 --batch 2 --steps 2 --rounds 1   # smoke run on CPU
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

SHAPES = {  # LLaMA-2 layout; 1b is TinyLlama-1.1B's shape (GQA 32/4), 7b is LLaMA-2 7B
    "tiny": {"vocab_size": 32000, "d_model": 256, "ffn_dim": 688, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4},
    "1b": {"vocab_size": 32000, "d_model": 2048, "ffn_dim": 5632, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4},
    "7b": {"vocab_size": 32000, "d_model": 4096, "ffn_dim": 11008, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32},
}


def random_rows(batch: int, seq_len: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, (batch, seq_len), dtype=np.int32)


def ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mellama_jax.config import MeshConfig, ModelConfig, OptimConfig, TrainConfig
    from mellama_jax.model.llama import train_flops_per_token
    from mellama_jax.model.sharding import make_mesh
    from mellama_jax.training.step import compile_step, init_state

    shape, devices = SHAPES[args.shape], jax.local_devices()
    model = ModelConfig(**shape, head_dim=shape["d_model"] // shape["n_heads"], max_seq_len=args.seq_len,
                        dtype="bfloat16", remat=args.remat, attention=args.attention)  # fmt: skip
    batch = args.batch * len(devices)
    cfg = TrainConfig(model=model, seq_len=args.seq_len, global_batch=batch, micro_batches=1, steps=10**6,
                      optim=OptimConfig(lr=1e-4, warmup_ratio=0.0), mesh=MeshConfig(fsdp=-1))  # fmt: skip
    mesh = make_mesh(cfg.mesh, devices)
    state, step = init_state(cfg, mesh), compile_step(cfg, mesh)
    tokens = random_rows(batch, args.seq_len, shape["vocab_size"])
    ones = np.ones_like(tokens)
    rows = {"tokens": tokens, "positions": np.broadcast_to(np.arange(args.seq_len), tokens.shape), "segment_ids": ones}
    rows = {k: jnp.asarray(v) for k, v in {**rows, "loss_mask": ones}.items()}
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = step(state, rows)
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    flops = train_flops_per_token(model, args.seq_len)
    return {"times": times, "tokens": batch * args.seq_len, "devices": len(devices),
            "kind": devices[0].device_kind, "flops_per_token": flops}  # fmt: skip


def torch_side(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["ffn_dim"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], max_position_embeddings=args.seq_len, attn_implementation="sdpa",
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device).train()  # fp32 master weights, as ours
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-5, fused=device == "cuda")
    tokens = torch.from_numpy(random_rows(args.batch, args.seq_len, shape["vocab_size"])).long().to(device)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"times": times, "tokens": args.batch * args.seq_len, "devices": 1, "kind": kind}


def child(side: str, args) -> dict:
    argv = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="1b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4, help="sequences per device")
    parser.add_argument("--attention", default="flash", help="ours: model.attention")
    parser.add_argument("--remat", default="full", help="ours: remat policy; torch: gradient checkpointing if not none")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per device; 0: from the device kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--side", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(ours(args) if args.side == "ours" else torch_side(args)))
        return
    from mellama_jax.hardware import RUNNING_PEAK_TFLOPS

    runs = {"ours": [], "torch": []}
    for _ in range(args.rounds):
        for side in runs:
            runs[side].append(child(side, args))
    print(f"machine: {platform.node()}, {os.cpu_count()} cores; shape {args.shape} {SHAPES[args.shape]}")
    print(f"seq {args.seq_len}, {args.batch} sequences per device, bf16 compute, fp32 AdamW, remat {args.remat}")
    print("| side | devices | device | median step s | tokens/s per device | MFU |\n|---|---|---|---|---|---|")
    flops, rate = runs["ours"][0]["flops_per_token"], {}
    for side, results in runs.items():
        first, median = results[0], statistics.median(t for r in results for t in r["times"])
        rate[side] = first["tokens"] / median / first["devices"]
        peak = args.peak_tflops or next((v for k, v in RUNNING_PEAK_TFLOPS.items() if k in first["kind"]), 0.0)
        mfu = f"{flops * rate[side] / (peak * 1e12):.1%}" if peak else "peak unknown"
        print(f"| {side} | {first['devices']} | {first['kind']} | {median:.3f} | {rate[side]:.0f} | {mfu} |")
    print(f"ratio ours / torch (tokens/s per device): {rate['ours'] / rate['torch']:.2f}x")


if __name__ == "__main__":
    main()
