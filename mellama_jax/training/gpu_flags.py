"""XLA settings for LLM training on NVIDIA GPUs, which `mellama train` applies before jax starts its backend.

XLA reads `XLA_FLAGS` once, when the first backend starts; a later change does nothing. So whether this run
will use GPUs is decided without asking jax (`jax.devices()` would start the backend it is meant to configure):
from `JAX_PLATFORMS` when it is set, else from an installed CUDA plugin (without one jax cannot use a GPU)
together with an NVIDIA device node (`/dev/nvidia0`, ...) or a `CUDA_VISIBLE_DEVICES` that names GPUs.
`nvidia-smi` is not asked: containers often lack it, and it costs a subprocess. A wrong "yes" costs nothing
(XLA parses GPU flags on every platform and only the GPU compiler reads them); a wrong "no" costs speed only.

`XLA_FLAGS` set by the user, even to nothing, is left exactly as it is. Print ours with
`python -m mellama_jax.training.gpu_flags` to extend them:
`XLA_FLAGS="$(python -m mellama_jax.training.gpu_flags) --xla_dump_to=hlo"`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, MutableMapping

from mellama_jax.hardware import gpu_ids

MIB, GIB = 2**20, 2**30

# Sources: the JAX GPU performance tips (docs.jax.dev/en/latest/gpu_performance_tips.html); NVIDIA JAX-Toolbox's
# "Tips for High-Performance LLMs with JAX and XLA" (docs/GPU_performance.md) and its MaxText Llama-2 SLURM
# example (docs/frameworks/maxtext/example_slurm.sub); MaxText's end_to_end/gpu/a3/test_llama2_7b.sh. Every name
# is checked against this jaxlib by tests/test_gpu_flags.py: XLA aborts on a flag it does not know.
FLAGS = {
    # Schedules collectives asynchronously around independent compute, so FSDP's weight all-gathers and
    # gradient reduce-scatters overlap the matmuls instead of stalling them (off by default in XLA).
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    # Combine the many small per-tensor collectives of a layer into few large ones: large NCCL messages use
    # the links' bandwidth, small ones pay latency. A layer's weights (all-gather) or gradients (reduce-scatter)
    # should fit; XLA's default is 256 bytes. Larger combines hold more memory at once: 256 MiB kept the
    # Me-LLaMA configs' compiled peaks within 0.2 GiB of XLA's defaults (BENCHMARKS.md), 1 GiB did not.
    "xla_gpu_all_gather_combine_threshold_bytes": str(256 * MIB),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(128 * MIB),
    # the data-parallel gradient all-reduce: large for bandwidth, yet small enough to overlap the backward pass
    "xla_gpu_all_reduce_combine_threshold_bytes": str(256 * MIB),
    # Combine collectives even when they gather or scatter along different dimensions (more, larger combines).
    "xla_gpu_enable_all_gather_combine_by_dim": "false",
    "xla_gpu_enable_reduce_scatter_combine_by_dim": "false",
}
# More overlap for more memory, not applied by default: they cost 9 GiB per device on 70B at 4 sequences per
# device (BENCHMARKS.md), so a config sized to the memory no longer fits. Add them where memory is to spare:
# XLA_FLAGS="$(python -m mellama_jax.training.gpu_flags --pipelined)".
PIPELINED = {
    # Pipeline the collectives of the scanned layers across loop iterations: the next layer's weights are
    # gathered (and the previous layer's gradients reduced) while this layer computes.
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    # Unroll the layer scan by two, so the pipelined collectives of one iteration can overlap the other's
    # compute without a copy at the loop boundary.
    "xla_gpu_enable_while_loop_double_buffering": "true",
}

CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")  # what `pip install jax[cuda12]` / [cuda13] installs


def xla_flags(pipelined: bool = False) -> str:
    """FLAGS (and PIPELINED, if asked) as an `XLA_FLAGS` value."""
    flags = {**FLAGS, **(PIPELINED if pipelined else {})}
    return " ".join(f"--{name}={value}" for name, value in flags.items())


def _cuda_plugin_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)


def gpu_present(env: Mapping[str, str] = os.environ) -> bool:
    """Whether jax, started with `env`, will run on NVIDIA GPUs (decided before jax starts; see the module doc)."""
    platforms = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:  # the user's choice, which jax follows strictly
        return any(p in ("cuda", "gpu") for p in platforms)
    return bool(gpu_ids(env)) and _cuda_plugin_installed()


def apply(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Sets `XLA_FLAGS` to FLAGS in `env` when the run will use NVIDIA GPUs and the user has not set `XLA_FLAGS`.
    Must run before jax starts its backend. Returns what was decided, for the log (None when not on GPUs)."""
    if not gpu_present(env):
        return None
    if "XLA_FLAGS" in env:
        return "XLA_FLAGS is set: used as it is, without mellama's GPU flags (python -m mellama_jax.training.gpu_flags)"
    env["XLA_FLAGS"] = xla_flags()
    return f"NVIDIA GPUs: XLA_FLAGS={env['XLA_FLAGS']} (set XLA_FLAGS yourself to replace them)"


if __name__ == "__main__":
    import sys

    print(xla_flags(pipelined="--pipelined" in sys.argv[1:]))
