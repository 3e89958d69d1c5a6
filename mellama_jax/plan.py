"""What a run costs before it is launched: parameters, FLOPs per token, memory per device."""

from __future__ import annotations

import math

import jax
from flax import nnx

from mellama_jax.config import ModelConfig, TrainConfig
from mellama_jax.model import abstract_model

# fp32 master weights + fp32 gradients + AdamW's two fp32 moments (DESIGN §3 precision).
TRAIN_STATE_BYTES_PER_PARAM = 4 + 4 + 8


def param_count(cfg: ModelConfig) -> int:
    """Counted from the model itself (`eval_shape`: nothing is allocated)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param)))


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward), causal attention counted.

    Every weight used in a matmul costs 2 FLOPs forward; the embedding table is a lookup unless it is
    tied to the output head, and norm scales are elementwise. q.k and p.v cost 2 x (2 T N H) per token
    under a full mask; a causal mask halves that on average.
    """
    d, layers = cfg.d_model, cfg.n_layers
    lookups = (0 if cfg.tie_embeddings else cfg.vocab_size * d) + (2 * layers + 1) * d
    causal_attention = layers * 2 * seq_len * cfg.n_heads * cfg.head_dim
    return 3 * (2 * (param_count(cfg) - lookups) + causal_attention)


def plan(cfg: TrainConfig, devices: int) -> list[tuple[str, str]]:
    """Rows of (what, how much) for a run sharded fully (FSDP) over `devices`."""
    m, t = cfg.model, cfg.seq_len
    params = param_count(m)
    tokens_per_step = cfg.global_batch * t
    flops_per_token = train_flops_per_token(m, t)
    act_bytes = 2 if m.dtype in ("bfloat16", "float16") else 4
    # With remat, each layer keeps its input [T, D]; the einsum attention path holds fp32 scores [N, T, T].
    residuals = m.n_layers * t * m.d_model * act_bytes if m.remat != "none" else None
    scores = m.n_heads * t * t * 4
    gib = 2**30
    return [
        ("parameters", f"{params:,}"),
        (
            "train state per device (fp32 weights, grads, AdamW)",
            f"{params * TRAIN_STATE_BYTES_PER_PARAM / devices / gib:.2f} GiB",
        ),
        ("tokens per optimiser step", f"{tokens_per_step:,}"),
        ("training FLOPs per token", f"{flops_per_token:.3e}"),
        ("training FLOPs per step", f"{flops_per_token * tokens_per_step:.3e}"),
        ("layer-input checkpoints per sequence", "no remat" if residuals is None else f"{residuals / gib:.2f} GiB"),
        ("attention scores per sequence, one layer (einsum path)", f"{scores / gib:.2f} GiB"),
    ]
