"""Causal self-attention behind one signature: `attend(q, k, v) -> out`, q [B, T, N, H], k and v [B, S, K, H]
(a KV cache's, `cached`: heads first, [B, K, S, H], as the cache stores them).

Query head n uses kv head n // G. A row may hold several documents (segment ids, 0 = padding); a query sees
a key iff the key's slot is not after its own and both share a segment. Implementations (`model.attention`):

  xla    the reference: fp32 scores [B, N, T, S] under the mask from `attention_mask`.
  flash  the FlashAttention-2 Triton kernel that JAX ships (Pallas): segment ids instead of a T×S mask,
         blocks above the diagonal skipped, a Triton backward. Off GPU it runs interpreted (slow, same math).
  cudnn  cuDNN's fused attention (`jax.nn.dot_product_attention`); it takes no segment ids, so rows given
         segment ids (packed rows) go to flash.
  auto   flash on GPU, xla elsewhere.

Decoding against a KV cache always uses xla (`cached`): one new query per row needs no kernel. The cache is
stored heads first so that each (row, kv head) reads its keys as one contiguous [S, H] block: stored [S, K, H],
XLA:GPU kept a transposed copy of the whole cache (70B at 32 x 4096 on one H100: 20 GiB), and on a CPU a
16-row step's attention over 512 slots took a sixth longer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention
from jax.sharding import PartitionSpec

from mellama_jax.config import ATTENTION
from mellama_jax.model.sharding import current_mesh, spec

# q [B, T, N, H], k [B, S, K, H], v [B, S, K, H] (cached: [B, K, S, H]) -> [B, T, N, H]
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

FLASH_BLOCK = 128  # the kernel's default tile (forward); its backward uses tiles of 32
GPU_PLATFORMS = ("gpu", "cuda")


def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, q_offset: jax.Array | int = 0) -> jax.Array:
    """[B, T, S] bool: query t (at slot q_offset + t) sees key s iff s <= that slot and both share a segment.

    Causality is by slot, not by position, so documents packed into one row (positions restarting at 0)
    are kept apart by their segment ids alone. `q_offset` is one slot for every row, or one per row [B].
    """
    q_slot = jnp.asarray(q_offset)[..., None] + jnp.arange(q_segments.shape[1])  # [T] or [B, T]
    causal = jnp.arange(kv_segments.shape[1]) <= q_slot[..., None]  # [T, S] or [B, T, S]
    same_segment = q_segments[:, :, None] == kv_segments[:, None, :]  # [B, T, S]
    return causal & same_segment


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention, scores in fp32: q [B, T, N, H], k and v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]."""
    return attend_heads_first(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


def attend_heads_first(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attend` with k and v [B, K, S, H], as the KV cache holds them.

    Query head n uses kv head n // G. The G query heads and T queries of a kv head are one [G*T, H]
    matrix, so both products are plain batched matmuls over (B, K).
    """
    b, t, n, h = q.shape
    kv_heads, g = k.shape[1], n // k.shape[1]
    q = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h)  # [B, K, G*T, H]
    scores = jnp.einsum("BKMH,BKSH->BKMS", q, k, preferred_element_type=jnp.float32).reshape(b, kv_heads, g, t, -1)
    scores = jnp.where(mask[:, None, None], scores * h**-0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kv_heads, g * t, -1)
    out = jnp.einsum("BKMS,BKSH->BKMH", probs, v).reshape(b, kv_heads, g, t, h)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _platform() -> str:
    """The platform being compiled for: the activation mesh's devices (a deviceless GPU target included), else JAX's."""
    mesh = current_mesh()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def resolve(implementation: str) -> str:
    """`auto` made concrete for the platform being traced for; the other names unchanged."""
    if implementation not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {implementation!r}")
    if implementation == "auto":
        return "flash" if _platform() in GPU_PLATFORMS else "xla"
    return implementation


def self_attention(implementation: str, segment_ids: jax.Array | None) -> Attend:
    """Attention of a row over itself (training, scoring): `segment_ids` [B, T], None = one document per row."""
    implementation = resolve(implementation)
    if implementation == "cudnn" and segment_ids is None:
        return cudnn
    if implementation in ("flash", "cudnn"):
        return functools.partial(flash, segment_ids=segment_ids)

    def xla(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        segments = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
        return attend(q, k, v, attention_mask(segments, segments))

    return xla


def cached(
    q_segments: jax.Array, kv_segments: jax.Array, q_offset: jax.Array | int, window: int | None = None
) -> Attend:
    """Attention of T new queries (at slots q_offset...) over a KV cache [B, K, S, H] whose segments are
    `kv_segments` [B, S]; with `window`, over its first `window` slots only (the caller knows no row has written
    past them)."""
    mask = attention_mask(q_segments, kv_segments[:, :window], q_offset)
    return lambda q, k, v: attend_heads_first(q, k[:, :, :window], v[:, :, :window], mask)


def flash_blocks(t: int) -> tuple[int, pallas_attention.BlockSizes]:
    """(T padded, the kernel's tiles): tiles are powers of two of at least 16 (Triton's smallest dot), T a multiple.

    A row shorter than 128 gets one tile of the next power of two; a longer one is padded to a multiple of 128.
    """
    block = min(FLASH_BLOCK, max(16, 1 << (t - 1).bit_length()))
    backward = min(32, block)
    return -(-t // block) * block, pallas_attention.BlockSizes(block, block, backward, backward, backward, backward)


def flash(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    segment_ids: jax.Array | None = None,  # [B, T] int, None = one document per row
    interpret: bool | None = None,  # None: interpreted unless compiling for a GPU
) -> jax.Array:  # [B, T, N, H]
    """The Pallas Triton kernel (`jax.experimental.pallas.ops.gpu.attention.mha`) with GQA and any T.

    The kernel's causal mask compares slot indices from 0 for queries and keys alike, as `attention_mask`
    does; its segment mask is plain equality, so padding (segment 0) sees padding, as in the reference.
    Under an activation mesh it runs per shard (a Triton call cannot be partitioned by XLA): rows split as
    the batch is, heads as the kv heads are.
    """
    if interpret is None:
        interpret = _platform() not in GPU_PLATFORMS
    mesh = current_mesh()
    if mesh is None:
        return _flash_local(q, k, v, segment_ids, interpret)
    b, n, kv_heads = q.shape[0], q.shape[2], k.shape[2]
    rows, heads = spec(("batch",))[0], spec(("kv_heads",))[0]
    rows = rows if b % _size(mesh, rows) == 0 else None
    heads = heads if kv_heads % _size(mesh, heads) == 0 and n % _size(mesh, heads) == 0 else None
    per_token = PartitionSpec(rows, None, heads, None)
    local = jax.shard_map(
        functools.partial(_flash_local, interpret=interpret),
        mesh=mesh,
        in_specs=(per_token, per_token, per_token, None if segment_ids is None else PartitionSpec(rows, None)),
        out_specs=per_token,
        check_vma=False,
    )
    return local(q, k, v, segment_ids)


def _size(mesh: jax.sharding.Mesh, axes: str | tuple[str, ...] | None) -> int:
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def _flash_local(q, k, v, segment_ids, interpret: bool) -> jax.Array:
    _, t, n, h = q.shape
    g = n // k.shape[2]
    # The kernel has no GQA (it would pair query head n with kv head n): give each query head its kv head.
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # [B, T, N, H]
    padded, blocks = flash_blocks(t)
    if padded != t:
        # Appended slots come after every real one, so causality hides them from real queries; their
        # queries are sliced off, so they add nothing to any gradient either.
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v = pad(q), pad(k), pad(v)
        segment_ids = None if segment_ids is None else pad(segment_ids)
    out = pallas_attention.mha(
        q, k, v, segment_ids, sm_scale=h**-0.5, causal=True, block_sizes=blocks, interpret=interpret
    )
    return out[:, :t]


def cudnn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN's fused causal attention for rows of one document (GQA native); needs the CUDA wheels even to trace."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
