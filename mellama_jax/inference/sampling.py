"""Choosing the next token, each row with its own settings: temperature, then top-k, then top-p (transformers'
order). A row with temperature 0 takes the argmax. The sort that top-k and top-p need runs only when some row
asks for one of them, so a greedy or plain-temperature batch costs an argmax or a draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] divided by each row's temperature (> 0), -inf outside its top-k (0 = off), then outside its
    top-p nucleus (1 = off): the smallest head of the ranking whose mass reaches top_p."""
    v = logits.shape[-1]
    logits = logits / temperature[:, None]

    def restricted(logits):
        ranked = -jnp.sort(-logits, axis=-1)  # descending
        k = jnp.where((top_k > 0) & (top_k < v), top_k, v)
        kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
        ranked = jnp.where(jnp.arange(v) < k[:, None], ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        kept = jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]  # a token stays if those above it fall short
        lowest = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
        return jnp.where((top_p[:, None] < 1) & (logits < lowest), -jnp.inf, logits)

    some = jnp.any((top_k > 0) & (top_k < v)) | jnp.any(top_p < 1)
    return jax.lax.cond(some, restricted, lambda x: x, logits)


def sample_rows(
    logits: jax.Array,  # [B, V] fp32
    keys: jax.Array,  # [B] one key per row
    temperature: jax.Array,  # [B] float, 0 = greedy
    top_k: jax.Array,  # [B] int, 0 = off
    top_p: jax.Array,  # [B] float, 1 = off
) -> jax.Array:
    """One token per row -> [B] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def drawn(logits):
        filtered = filter_rows(logits, jnp.where(temperature > 0, temperature, 1.0), top_k, top_p)
        return jnp.where(temperature > 0, jax.vmap(jax.random.categorical)(keys, filtered), greedy).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature > 0), drawn, lambda _: greedy, logits)
