"""Generation speed on CPU: our jitted decode loop against `transformers` `generate` on the same weights, one run.

A random model shaped like SmolLM2-135M (d 576, 30 layers, 9 heads / 3 kv heads, FFN 1536, vocab 49152,
tied embeddings, θ 1e5), fp32 on both sides, greedy, every row exactly `--new-tokens` new tokens (no
end-of-sequence id on either side), prompts of `--prompt-len` random tokens, at batch 1 and batch 16.
The parent writes the weights once; each side runs in its own child process limited to `--threads`
threads, alternating ours/torch for `--rounds` rounds of `--repeats` timed calls. Our first call
compiles: its excess over the median call is reported as compile time and excluded from the rate.
Nothing is asserted: the figures go to BENCHMARKS.md. Goals: >= 2x at batch 1, >= 1.5x at batch 16.

    python benchmarks/generate_speed.py            # the issue's settings
    python benchmarks/generate_speed.py --smoke    # a tiny model, to check the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

SHAPE = {
    "vocab_size": 49152, "d_model": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64,
    "ffn_dim": 1536, "rope_theta": 1e5, "tie_embeddings": True,
}  # fmt: skip
SMOKE = {
    **SHAPE,
    "vocab_size": 512,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 16,
    "ffn_dim": 96,
}


def model_config(args):
    from mellama_jax.config import ModelConfig

    shape = SMOKE if args.smoke else SHAPE
    return ModelConfig(**shape, max_seq_len=2048, dtype="float32", param_dtype="float32", remat="none")


def prompts(args, batch: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, model_config(args).vocab_size, (batch, args.prompt_len)).tolist()


def ours(args, weights: str) -> dict[str, list[float]]:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from mellama_jax.hf.table import params_from_hf
    from mellama_jax.inference.generate import Loaded, Sampling, decode_mesh, generate

    cfg = model_config(args)
    mesh = decode_mesh(cfg, jax.devices()[:1])
    params = jax.device_put(params_from_hf(dict(np.load(weights)), cfg), NamedSharding(mesh, PartitionSpec()))
    model = Loaded(cfg, params, tokenizer=None, eos_ids=(), mesh=mesh, fingerprint="")
    sampling = Sampling(max_new_tokens=args.new_tokens)
    times = {}
    for batch in args.batches:
        rows, calls = prompts(args, batch), []
        for _ in range(1 + args.repeats):
            start = time.perf_counter()
            out = generate(model, rows, sampling, batch_size=batch)
            calls.append(time.perf_counter() - start)
            assert all(len(o) == args.new_tokens for o in out)
        times[str(batch)] = calls
    return times


def torch_side(args, weights: str) -> dict[str, list[float]]:
    import numpy as np
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from mellama_jax.hf.config import hf_config

    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM(LlamaConfig(**hf_config(model_config(args)))).eval()
    state = {k: torch.from_numpy(v) for k, v in np.load(weights).items()}
    model.load_state_dict(state, strict=False)  # tied: no lm_head.weight in the file
    model.tie_weights()
    generation = GenerationConfig(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
        pad_token_id=0,
    )  # fmt: skip
    times = {}
    for batch in args.batches:
        rows, calls = torch.tensor(prompts(args, batch)), []
        for _ in range(1 + args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(rows, generation_config=generation)
            calls.append(time.perf_counter() - start)
            assert out.shape[1] == args.prompt_len + args.new_tokens
        times[str(batch)] = calls
    return times


def write_weights(args, path: str) -> None:
    """The weights of a random transformers model (tied: lm_head left out), as numpy arrays."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mellama_jax.hf.config import hf_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf_config(model_config(args))))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    np.savez(path, **state)


def child(side: str, args, weights: str) -> dict[str, list[float]]:
    """One side's call times per batch size, from a fresh process limited to `--threads` threads."""
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    argv = [sys.executable, __file__, "--side", side, "--weights", weights, *sys.argv[1:]]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and few tokens: checks the script runs")
    parser.add_argument("--side", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.new_tokens, args.repeats, args.rounds = min(args.new_tokens, 8), 1, 1
    if args.side:
        print(json.dumps((ours if args.side == "ours" else torch_side)(args, args.weights)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        write_weights(args, weights)
        runs = {"ours": [], "torch": []}
        for _ in range(args.rounds):
            for side in runs:
                runs[side].append(child(side, args, weights))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.threads} threads")
    print(f"shape {SMOKE if args.smoke else SHAPE}; fp32, greedy, prompt {args.prompt_len} + {args.new_tokens} new")
    print("| batch | ours tokens/s | torch tokens/s | ratio | ours compile s |\n|---|---|---|---|---|")
    for batch in map(str, args.batches):
        median = {side: statistics.median(t for run in r for t in run[batch][1:]) for side, r in runs.items()}
        compile_s = statistics.median(run[batch][0] for run in runs["ours"]) - median["ours"]
        rate = {side: int(batch) * args.new_tokens / m for side, m in median.items()}
        print(f"| {batch} | {rate['ours']:.0f} | {rate['torch']:.0f} | {rate['ours'] / rate['torch']:.2f}x"
              f" | {compile_s:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
