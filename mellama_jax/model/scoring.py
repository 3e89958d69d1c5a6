"""Log-probabilities of given tokens at given positions, without the [B, T, V] logits.

Scoring reads few positions: a multiple-choice continuation is a handful of tokens after a long question. The
model runs to its final hidden states, the positions to score are gathered ([B, K, D]), and only those meet the
output projection, a piece of positions at a time, each piece's [B, piece, V] fp32 logits reduced to log P(target)
and argmax before the next: at most LOGIT_BYTES of logits exist at once, however long the rows. LLaMA-2 scoring
8 rows of 4,096 tokens would otherwise hold 8 × 4096 × 32000 × 4 B = 4.2 GB of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mellama_jax.config import ModelConfig
from mellama_jax.model.llama import with_params

LOGIT_BYTES = 256 << 20  # the most fp32 logits held at once


def piece_length(rows: int, vocab: int, positions: int) -> int:
    """Positions per projected piece: a power of two whose [rows, piece, vocab] fp32 logits fit LOGIT_BYTES
    (at least 1), no longer than `positions` needs."""
    piece = 1
    while piece < positions and rows * 2 * piece * vocab * 4 <= LOGIT_BYTES:
        piece *= 2
    return piece


def token_logprobs(
    cfg: ModelConfig,
    params: dict,
    scales: dict,  # quantized layer weights' scales ({} = none)
    tokens: jax.Array,  # [B, T] int: the model's input, one document per row from position 0
    picks: jax.Array,  # [B, K] int: the positions to score
    targets: jax.Array,  # [B, K] int: the token expected after each picked position
) -> tuple[jax.Array, jax.Array]:
    """(log P(target) [B, K] in fp32, the most likely token [B, K] int32) at each picked position."""
    model = with_params(cfg, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model(tokens, positions, quant_scales=scales or None, head=False)  # [B, T, D]
    hidden = jnp.take_along_axis(hidden, picks[..., None], axis=1)  # [B, K, D]
    b, k = picks.shape
    piece = piece_length(b, cfg.vocab_size, k)
    pieces = -(-k // piece)
    pad = pieces * piece - k
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, pieces, piece, -1).swapaxes(0, 1)
    wanted = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, pieces, piece).swapaxes(0, 1)

    def score(x, target):  # [B, piece, D], [B, piece] -> [B, piece] twice
        logits = model.head(x)
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)

    logp, top = jax.lax.map(lambda xs: score(*xs), (hidden, wanted))  # [pieces, B, piece]
    unpiece = lambda a: a.swapaxes(0, 1).reshape(b, -1)[:, :k]  # noqa: E731
    return unpiece(logp), unpiece(top)
