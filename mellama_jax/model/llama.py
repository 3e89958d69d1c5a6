"""LLaMA-2 in Flax NNX, in the order the paper describes it.

Dimension letters, used in every einsum and shape comment:
  B batch          T query length     S key length      D model width     F MLP hidden
  N query heads    K kv heads         G = N / K         H head dim        V vocab      L layers

Parameters are stored in einsum shapes (q is [D, N, H], not HF's flattened [N*H, D]) and carry logical
axis names only; `sharding.py` maps those names to mesh axes. RoPE keeps HF's rotate-half layout, so
converted HF weights need no q/k permutation. Attention's kernels (xla reference, flash, cudnn) live in
`attention.py`; `model.attention` picks one, and the layers receive it as one function.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import checkify

from mellama_jax.config import ModelConfig
from mellama_jax.model import attention, lora, quant
from mellama_jax.model.sharding import constrain

# The decode cache: {"k", "v": [L, B, S, K, H], "segment_ids": [B, S], "index": [] or [B]}. One index for every
# row (generate's batches) or one per row (the serving engine's slots, each at its own length). Called with fewer
# rows than the cache holds, the model reads and writes the cache's first rows only.
Cache = dict[str, jax.Array]
CACHE_KV = ("layers", "batch", "kv_heads", "length", "head_dim")  # heads first: attention.py says why

# Activations' logical names (sharding.constrain pins them when a mesh is set).
RESIDUAL, HIDDEN, LOGITS = ("batch", "length", "act_embed"), ("batch", "length", "mlp"), ("batch", "length", "vocab")
HEADS, KV_HEADS = ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim")

REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype: Any = None) -> jax.Array:
    """x [..., *in] · w [*in, *out] -> [..., *out], as one 2-D matmul.

    Same result as the einsum; but XLA:CPU runs dots that contract or keep several dims (B and T in the
    weight gradient) far slower than a plain [B*T, in] x [in, out] matmul, and on GPU the reshapes are free.
    """
    ins, outs = x.shape[x.ndim - n_in :], w.shape[n_in:]
    flat = jnp.matmul(x.reshape(-1, math.prod(ins)), w.reshape(math.prod(ins), -1), preferred_element_type=out_dtype)
    return flat.reshape(*x.shape[: x.ndim - n_in], *outs)


def cast(w: nnx.Param, dtype: Any) -> jax.Array:
    """The parameter in the compute dtype, converted where its shards lie: an FSDP gather then moves bf16, not fp32."""
    value = w[...]
    names = w.get_metadata()["out_sharding"][-value.ndim :]  # inside the layer scan a slice has no "layers" axis
    return constrain(value.astype(dtype), names)


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape: tuple[int, ...], names: tuple[str, ...]) -> nnx.Param:
    init = jax.nn.initializers.normal(cfg.init_std)
    # Logical names only: the sharded init in training/step.py turns them into placements (no eager sharding here).
    return nnx.Param(init(rngs.params(), shape, cfg.param_dtype), out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        ones = jnp.ones((cfg.d_model,), cfg.param_dtype)
        self.scale = nnx.Param(ones, out_sharding=("embed",), eager_sharding=False)  # [D]
        self.eps = cfg.rms_eps

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * cast(self.scale, x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF rotate-half layout: x [B, T, n, H], positions [B, T]."""
    h = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = _param(rngs, cfg, (d, n, h), ("embed", "heads", "head_dim"))
        self.k = _param(rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.v = _param(rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.o = _param(rngs, cfg, (n, h, d), ("heads", "head_dim", "embed"))
        self.theta = cfg.rope_theta

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        attend: attention.Attend,  # (q, k, v) -> [B, T, N, H], as model.attention chose
        kv: tuple[jax.Array, jax.Array] | None = None,  # the whole stack's cache ([L, B, K, S, H], [L, B, K, S, H])
        index: jax.Array | int = 0,  # slot of x's first token in the cache: one, or one per row [B]
        layer: jax.Array | int = 0,  # this layer's index into the cache's L axis
        rows: dict | None = None,  # per-row LoRA of this layer (lora.row_delta), or None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        dt, rows = x.dtype, rows or {}
        q = constrain(dense(x, cast(self.q, dt)) + lora.row_delta(x, rows.get("q")), HEADS)  # [B, T, N, H]
        k = constrain(dense(x, cast(self.k, dt)) + lora.row_delta(x, rows.get("k")), KV_HEADS)  # [B, T, K, H]
        v = constrain(dense(x, cast(self.v, dt)) + lora.row_delta(x, rows.get("v")), KV_HEADS)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        if kv is not None:
            # The new slots are written into the stack in place and this layer's slice is read back: a cache
            # passed layer by layer (scan xs -> ys) would be copied whole at every decoding step.
            k_all, v_all = write_kv(kv[0], k, layer, index), write_kv(kv[1], v, layer, index)  # [L, B, K, S, H]
            b = x.shape[0]  # the cache's first rows, if it has more (the serving engine's idle slots)
            kv, k, v = (k_all, v_all), k_all[layer, :b], v_all[layer, :b]  # this layer's [B, K, S, H]
        out = attend(q, k.astype(dt), v.astype(dt))  # [B, T, N, H]
        return dense(out, cast(self.o, dt), n_in=2) + lora.row_delta(out, rows.get("o"), n_in=2), kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ffn_dim
        self.gate = _param(rngs, cfg, (d, f), ("embed", "mlp"))
        self.up = _param(rngs, cfg, (d, f), ("embed", "mlp"))
        self.down = _param(rngs, cfg, (f, d), ("mlp", "embed"))

    def __call__(self, x: jax.Array, rows: dict | None = None) -> jax.Array:  # [B, T, D] -> [B, T, D]
        dt, rows = x.dtype, rows or {}
        gate = jax.nn.silu(constrain(dense(x, cast(self.gate, dt)) + lora.row_delta(x, rows.get("gate")), HIDDEN))
        up = constrain(dense(x, cast(self.up, dt)) + lora.row_delta(x, rows.get("up")), HIDDEN)  # [B, T, F]
        hidden = gate * up
        return dense(hidden, cast(self.down, dt)) + lora.row_delta(hidden, rows.get("down"))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, attend, kv=None, index=0, layer=0, rows=None):
        h, kv = self.attn(self.attn_norm(x), positions, attend, kv, index, layer, rows)
        x = constrain(x + h, RESIDUAL)
        return constrain(x + self.mlp(self.mlp_norm(x), rows), RESIDUAL), kv


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, cfg, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))  # [V, D]

        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(key: jax.Array) -> Block:
            return Block(cfg, rngs=nnx.Rngs(params=key))

        self.layers = stacked_blocks(jax.random.split(rngs.params(), cfg.n_layers))  # every leaf [L, ...]
        self.final_norm = RMSNorm(cfg)
        self.lm_head = (
            None if cfg.tie_embeddings else _param(rngs, cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
        )

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int
        positions: jax.Array,  # [B, T] int
        segment_ids: jax.Array | None = None,  # [B, T] int; None = one document per row
        cache: Cache | None = None,
        adapters: dict | None = None,  # LoRA: {target: {"a": [L, *in, r], "b": [L, r, *out]}} (lora.py)
        lora_scale: float = 1.0,
        row_adapters: dict | None = None,  # one LoRA per row: {target: {"a": [L, B, *in, r], "b": [L, B, r, *out]}}
        quant_scales: dict | None = None,  # the scales of layer weights held quantized (quant.py)
        window: int | None = None,  # decoding: attend to the cache's first `window` slots only (all that is written)
        head: bool = True,  # False: the final hidden states [B, T, D] instead of logits (model/scoring.py)
    ) -> tuple[jax.Array, Cache | None]:
        """Returns fp32 logits [B, T, V] and, when decoding, the cache advanced by T slots.

        With `adapters`, each layer runs with W + lora_scale·A·B, formed inside the scan one layer at a time.
        With `row_adapters` (scale folded into b), row i adds x·A_i·B_i to each target's output: requests for
        different adapters share a batch. With `quant_scales`, the layer weights those name are integers,
        dequantized inside the scan one layer at a time.
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        table = constrain(cast(self.embed, dt), ("vocab", "act_embed"))  # gathered whole over fsdp, as FSDP does
        x = constrain(jnp.take(table, tokens, axis=0), RESIDUAL)  # [B, T, D]

        if cache is None:
            index, kv_in = 0, None
            attend = attention.self_attention(cfg.attention, segment_ids)
        else:
            segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
            index, kv_in = cache["index"], (cache["k"], cache["v"])
            check_room(index, tokens.shape[1], cache["segment_ids"].shape[1])
            kv_segments = write_segments(cache["segment_ids"], segment_ids, index)
            attend = attention.cached(segment_ids, kv_segments[: tokens.shape[0]], index, window)

        graphdef, layer_state = nnx.split(self.layers)

        def layer(carry, xs):  # the cache rides in the carry: updated in place, layer by layer
            (x, kv), (params, ab, rows, scales, i) = carry, xs
            pure = quant.dequantize(nnx.to_pure_dict(params), scales)
            nnx.replace_by_pure_dict(params, lora.merge_layer(pure, ab, lora_scale))
            return nnx.merge(graphdef, params)(x, positions, attend, kv, index, i, rows), None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT[cfg.remat])
        xs = (layer_state, adapters or {}, row_adapters or {}, quant_scales or {}, jnp.arange(cfg.n_layers))
        (x, kv_out), _ = jax.lax.scan(layer, (x, kv_in), xs)

        x = self.final_norm(x)
        if cache is not None:
            k, v = kv_out
            cache = {"k": k, "v": v, "segment_ids": kv_segments, "index": index + tokens.shape[1]}
        return (self.head(x) if head else x), cache

    def head(self, x: jax.Array) -> jax.Array:
        """Final hidden states [B, T, D] (as `head=False` returns them) -> fp32 logits [B, T, V]."""
        dt = jnp.dtype(self.cfg.dtype)
        # Gathered in bf16 here: left to the partitioner, the backward's fp32 product gathers an fp32 copy.
        if self.lm_head is None:  # tied: contract the table's D axis as it lies; `.T` would copy [V, D] per call
            table = constrain(cast(self.embed, dt), ("vocab", "act_embed"))
            logits = jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)
        else:
            logits = dense(x, constrain(cast(self.lm_head, dt), ("act_embed", "vocab")), out_dtype=jnp.float32)
        return constrain(logits, LOGITS)


def check_room(index: jax.Array | int, t: int, slots: int) -> None:
    """Refuses to write `t` slots from `index` into a cache of `slots`.

    `dynamic_update_slice` would clamp the index while the mask keeps the true one, misaligning keys and
    queries without a sound. A concrete index is checked here; a traced one with `checkify.check`, which
    jit refuses unless the caller wraps its function in `checkify.checkify` and throws the error it returns.
    """
    message = f"KV cache overflow: writing {t} slots at index {{index}} of a cache of {slots}"
    if not isinstance(index, jax.core.Tracer):
        if int(np.max(index)) + t > slots:
            raise ValueError(message.format(index=int(np.max(index))))
    else:
        checkify.check(jnp.all(index + t <= slots), message, index=jnp.max(index))


def write_segments(segment_ids: jax.Array, new: jax.Array, index: jax.Array | int) -> jax.Array:
    """The cache's `segment_ids` [B, S] with new [B, T] written from slot `index` (or one per row)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(segment_ids, new, (0, index))
    rows, t = new.shape
    slots = index[:, None] + jnp.arange(t)  # [B, T]: where each row's new entries go
    return segment_ids.at[jnp.arange(rows)[:, None], slots].set(new, unique_indices=True, indices_are_sorted=True)


def write_kv(stack: jax.Array, new: jax.Array, layer: jax.Array | int, index: jax.Array | int) -> jax.Array:
    """`stack` [L, B, K, S, H] with new [B, T, K, H] written into layer `layer` from slot `index` (or one per row)."""
    new = new.astype(stack.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(stack, new.transpose(0, 2, 1, 3)[None], (layer, 0, 0, index, 0))
    rows, t = new.shape[:2]
    slots = index[:, None] + jnp.arange(t)  # [B, T]
    # Advanced indices split by a slice put their [B, T] first: the update is laid out as `new` is.
    return stack.at[layer, jnp.arange(rows)[:, None], :, slots].set(new, unique_indices=True)


def cache_shape(cfg: ModelConfig, batch: int, max_len: int) -> tuple[int, ...]:
    """The shape of a decode cache's keys (and values): [L, B, K, S, H]."""
    return (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty decode cache for `max_len` slots; slots fill left to right."""
    shape, dtype = cache_shape(cfg, batch, max_len), dtype or cfg.dtype
    return {
        "k": constrain(jnp.zeros(shape, dtype), CACHE_KV),
        "v": constrain(jnp.zeros(shape, dtype), CACHE_KV),
        "segment_ids": constrain(jnp.zeros((batch, max_len), jnp.int32), ("batch", "length")),
        "index": jnp.zeros((), jnp.int32),
    }


def abstract_model(cfg: ModelConfig) -> Llama:
    """The model with ShapeDtypeStructs for values: shapes, dtypes and logical names, nothing allocated."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


def with_params(cfg: ModelConfig, params: dict) -> Llama:
    """A model holding `params` (a nested dict shaped like `nnx.to_pure_dict` output), nothing initialised."""
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@functools.cache  # a search asks for it per candidate; tracing the model takes a while
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
