"""Wasted work in the train step: the FLOPs it executes over the FLOPs the model needs.

- Whole step, xla attention: XLA's `cost_analysis()` of the compiled step (every dot and elementwise op:
  masked-out attention scores, remat's recomputation, the optimizer) over `model.llama.train_flops_per_token` ×
  tokens (3 × forward, causal attention counted once). XLA counts a while loop's body once, whatever its
  trip count, so the step is compiled with one layer (the layer scan runs once) and one micro-batch.
- Attention alone, per path: the score and value products each path computes, over the causal half that
  the model needs. xla computes every [T, S] score and masks; flash (Pallas) computes only the tiles at or
  below the diagonal (`attention.flash_blocks` gives its tiles). The kernel's grid is a loop, so this part
  is counted from the tiles, not from `cost_analysis`.

    python benchmarks/step_flops.py                 # d 512, 1 layer, 8 x 4096 tokens, remat none and full
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def executed(cfg) -> float:
    import jax

    from mellama_jax.model.sharding import batch_sharding, make_mesh
    from mellama_jax.training.step import BATCH_KEYS, abstract_state, compile_step

    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    rows = jax.ShapeDtypeStruct((cfg.global_batch, cfg.seq_len), "int32", sharding=batch_sharding(mesh))
    lowered = compile_step(cfg, mesh).lower(abstract_state(cfg, mesh), dict.fromkeys(BATCH_KEYS, rows))
    analysis = lowered.compile().cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def attention_share(seq_len: int) -> dict[str, float]:
    """Score tiles each path computes, over the causal half the model needs."""
    from mellama_jax.model.attention import flash_blocks

    needed = seq_len * (seq_len + 1) / 2
    padded, blocks = flash_blocks(seq_len)
    tiles = padded // blocks.block_q
    flash = tiles * (tiles + 1) / 2 * blocks.block_q * blocks.block_k  # tiles at or below the diagonal
    return {"xla": seq_len * seq_len / needed, "flash": flash / needed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from mellama_jax.config import MeshConfig, ModelConfig, TrainConfig
    from mellama_jax.model.llama import train_flops_per_token

    print(f"d {args.d_model}, 1 layer, vocab 32000, {args.batch} x {args.seq_len} tokens, fp32, CPU compile")
    print("| step (xla attention) | model GFLOP | executed GFLOP | executed / model |\n|---|---|---|---|")
    for remat in ("none", "full"):
        heads, ffn = args.d_model // 64, args.d_model * 8 // 3 // 64 * 64
        model = ModelConfig(d_model=args.d_model, n_layers=1, n_heads=heads, n_kv_heads=heads, head_dim=64,
                            ffn_dim=ffn, max_seq_len=args.seq_len, dtype="float32", remat=remat,
                            attention="xla")  # fmt: skip
        cfg = TrainConfig(model=model, seq_len=args.seq_len, global_batch=args.batch, micro_batches=1, steps=10,
                          mesh=MeshConfig(fsdp=1))  # fmt: skip
        wanted = train_flops_per_token(model, args.seq_len) * args.batch * args.seq_len
        done = executed(cfg)
        print(f"| remat {remat} | {wanted / 1e9:.1f} | {done / 1e9:.1f} | {done / wanted:.2f} |")
    print(f"\n| attention scores at T = {args.seq_len} | computed / causal need |\n|---|---|")
    for path, share in attention_share(args.seq_len).items():
        print(f"| {path} | {share:.2f} |")


if __name__ == "__main__":
    main()
