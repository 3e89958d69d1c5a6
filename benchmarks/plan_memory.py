"""Per-device memory of the Me-LLaMA train steps, compiled for A100/H100 without a GPU (what `mellama plan` reports).

Each row compiles the step twice for compile-only devices (`devices.compile_only_devices`): with mellama's GPU
flags (`gpu_flags.py`, what `mellama train` sets on GPUs) and with XLA's defaults; the estimate is
`plan.estimate`. args: parameters, AdamW moments and the batch (donated); temp: XLA's temporaries; peak: args +
temp + non-aliased outputs + code. Fits: peak within 90 % of the device's memory.

    python benchmarks/plan_memory.py     # the table in BENCHMARKS.md ("Memory per device, compiled for A100")
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROWS = [  # (config, devices, kind, overrides)
    ("me-llama-13b-cpt", 8, "a100-80g", ["mesh.fsdp=8", "micro_batches=32"]),
    ("me-llama-13b-cpt", 8, "a100-80g", ["mesh.fsdp=8", "micro_batches=32", "model.attention=xla"]),
    ("me-llama-13b-cpt", 64, "a100-80g", []),
    ("me-llama-70b-cpt", 160, "a100-80g", []),
    ("me-llama-70b-cpt", 160, "h100-80g", []),
    ("me-llama-70b-cpt", 160, "a100-80g", ["global_batch=1280", "micro_batches=2"]),
    ("me-llama-70b-cpt", 160, "a100-80g", ["global_batch=1280", "micro_batches=2", "model.attention=xla"]),
    ("me-llama-70b-cpt", 8, "a100-80g", ["mesh.data=1", "mesh.fsdp=8", "micro_batches=120"]),
]


def main() -> None:
    import pathlib
    import time

    from mellama_jax.config_file import load_config
    from mellama_jax.hardware import KINDS
    from mellama_jax.planning.plan import estimate, layout, resolved_attention, xla_options
    from mellama_jax.planning.report import Target

    root, gib = pathlib.Path(__file__).resolve().parents[1], 2**30
    print(
        "| model | devices | mesh (data × fsdp × tensor) | seqs / device / micro-batch | micro-batches | attention "
        "| args GiB | temp GiB | peak GiB | peak GiB, XLA defaults | estimate GiB | fits (≤ 90 %) | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, count, kind_name, overrides in ROWS:
        cfg = load_config(str(root / "configs" / f"{name}.yaml"), overrides)
        kind, lay = KINDS[kind_name], layout(cfg, count)
        target, start = Target(kind, count), time.perf_counter()
        flagged = target.measure(cfg, lay, xla_options(kind))
        seconds = time.perf_counter() - start
        plain, guess = target.measure(cfg, lay), estimate(cfg, lay, kind.platform)
        args = flagged.params + flagged.opt_state + flagged.batch
        fits = "yes" if flagged.total <= kind.budget else "**no**"
        gibs = f"{args / gib:.2f} | {flagged.temp / gib:.2f} | **{flagged.total / gib:.2f}** | {plain.total / gib:.2f}"
        print(f"| {name.split('-')[2].upper()} | {count} × {kind_name} | {lay.data} × {lay.fsdp} × {lay.tensor} "
              f"| {lay.rows} | {lay.micro_batches} | {resolved_attention(cfg.model, kind.platform)} "
              f"| {gibs} | {guess.total / gib:.2f} | {fits} | {seconds:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
