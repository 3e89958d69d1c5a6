"""Every attention implementation against the reference (`attend` under `attention_mask`), on CPU.

The flash kernel runs in Pallas interpret mode here: the same kernel code (tiles, online softmax, causal
block skipping, the Triton backward's algorithm) executed by XLA:CPU, so shapes stay small.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mellama_jax.config import MeshConfig, ModelConfig, TrainConfig
from mellama_jax.errors import UserError
from mellama_jax.model import attention
from mellama_jax.model.attention import attend, attention_mask, flash, flash_blocks
from mellama_jax.model.llama import Llama, with_params
from mellama_jax.model.sharding import activation_mesh, batch_sharding, make_mesh
from mellama_jax.training.step import init_state, loss_sums

# Errors are measured relative to the largest reference value. fp32: both sides compute in fp32 and differ
# only in summation order and exp vs exp2 (measured <= 6e-7); 1e-5 leaves a 15x margin. bf16: both round
# the probabilities to bf16 before the product with V, flash before normalising and the reference after,
# so outputs and gradients differ by a few bf16 roundings (2^-8 = 3.9e-3 each; measured <= 8e-3).
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def packed_segments(t: int) -> jax.Array:
    """Row 0: three documents then trailing padding (segment 0); row 1: one document filling the row."""
    a, b, c = 3 * t // 16, 5 * t // 16, 6 * t // 16
    return jnp.array([[1] * a + [2] * b + [3] * c + [0] * (t - a - b - c), [1] * t])


def qkv(t: int, n: int, k: int, h: int, dtype, seed: int = 0) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(2, t, n, h), (2, t, k, h), (2, t, k, h), (2, t, n, h)]  # q, k, v, and an output cotangent
    return tuple(jax.random.normal(key, s, dtype) for key, s in zip(keys, shapes, strict=True))


def assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= TOLERANCE[dtype] * scale, f"max error {err:.3g} > {TOLERANCE[dtype]} x {scale:.3g}"


def check_flash_against_reference(t: int, n: int, k: int, h: int, dtype):
    q, key, value, cotangent = qkv(t, n, k, h, dtype)
    segments = packed_segments(t)
    out, flash_vjp = jax.vjp(lambda *a: flash(*a, segment_ids=segments), q, key, value)
    expected, reference_vjp = jax.vjp(lambda *a: attend(*a, attention_mask(segments, segments)), q, key, value)
    assert out.shape == expected.shape and out.dtype == expected.dtype == dtype
    assert_close(out, expected, dtype)
    for grad, expected_grad in zip(flash_vjp(cotangent), reference_vjp(cotangent), strict=True):
        assert grad.dtype == dtype
        assert_close(grad, expected_grad, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t, n, k, h", [(64, 9, 3, 16), (128, 64, 8, 16), (128, 4, 4, 32)], ids=["9/3", "64/8", "mha"])
def test_flash_equals_reference_on_packed_rows_forward_and_gradients(t, n, k, h, dtype):
    check_flash_against_reference(t, n, k, h, dtype)


@pytest.mark.parametrize("t", [100, 200])
def test_flash_pads_a_row_that_is_not_a_multiple_of_the_block(t):
    check_flash_against_reference(t, 4, 2, 16, jnp.float32)


def test_flash_blocks_are_powers_of_two_that_divide_the_padded_row():
    assert flash_blocks(4096) == (4096, attention.pallas_attention.BlockSizes(128, 128, 32, 32, 32, 32))
    assert flash_blocks(200)[0] == 256  # a multiple of 128
    assert flash_blocks(100) == (128, attention.pallas_attention.BlockSizes(128, 128, 32, 32, 32, 32))
    assert flash_blocks(24) == (32, attention.pallas_attention.BlockSizes(32, 32, 32, 32, 32, 32))
    assert flash_blocks(5) == (16, attention.pallas_attention.BlockSizes(16, 16, 16, 16, 16, 16))


def test_flash_without_segment_ids_is_causal_attention_over_the_whole_row():
    q, key, value, _ = qkv(32, 4, 2, 16, jnp.float32)
    ones = jnp.ones((2, 32), jnp.int32)
    assert_close(flash(q, key, value), attend(q, key, value, attention_mask(ones, ones)), jnp.float32)


def test_attention_is_checked_and_auto_means_xla_off_gpu():
    with pytest.raises(UserError, match="model.attention must be one of"):
        ModelConfig.tiny(attention="flash2")
    assert attention.resolve("auto") == "xla"
    with activation_mesh(make_mesh(MeshConfig(fsdp=-1))):  # the mesh's devices decide: CPU here
        assert attention.resolve("auto") == "xla"
    assert attention.resolve("flash") == "flash"


def test_cudnn_rows_with_segment_ids_go_to_flash():
    segments = packed_segments(16)
    assert attention.self_attention("cudnn", None) is attention.cudnn
    assert attention.self_attention("cudnn", segments).func is flash
    assert attention.self_attention("flash", segments).func is flash


def cudnn_available() -> bool:
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    try:
        jax.jit(attention.cudnn).lower(q, q, q)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


@pytest.mark.skipif(
    not cudnn_available(),
    reason="cuDNN fused attention needs a GPU and the CUDA wheels even to trace (jax raises 'cuDNN not found')",
)
def test_cudnn_equals_reference_on_rows_of_one_document():
    q, key, value, cotangent = qkv(128, 8, 2, 64, jnp.bfloat16)
    ones = jnp.ones((2, 128), jnp.int32)
    out, cudnn_vjp = jax.vjp(attention.cudnn, q, key, value)
    expected, reference_vjp = jax.vjp(lambda *a: attend(*a, attention_mask(ones, ones)), q, key, value)
    assert_close(out, expected, jnp.bfloat16)
    for grad, expected_grad in zip(cudnn_vjp(cotangent), reference_vjp(cotangent), strict=True):
        assert_close(grad, expected_grad, jnp.bfloat16)


MODEL = ModelConfig.tiny(vocab_size=128, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, init_std=0.1)


def packed_batch(b: int, t: int, vocab: int) -> dict:
    segments = np.concatenate([np.asarray(packed_segments(t))] * (b // 2))
    positions = np.zeros_like(segments)
    for row in range(b):
        for doc in set(segments[row].tolist()) - {0}:
            positions[row, segments[row] == doc] = np.arange((segments[row] == doc).sum())
    tokens = np.random.default_rng(0).integers(3, vocab, segments.shape)
    return {"tokens": tokens, "positions": positions, "segment_ids": segments, "loss_mask": (segments != 0) * 1}


def mean_loss(cfg: TrainConfig, params: dict, batch: dict) -> jax.Array:
    loss_sum, count = loss_sums(cfg, params, batch)
    return loss_sum / count


def test_llama_with_flash_equals_xla_on_a_packed_batch():
    batch = {k: jnp.asarray(v) for k, v in packed_batch(2, 64, MODEL.vocab_size).items()}
    params = nnx.to_pure_dict(nnx.state(Llama(MODEL, rngs=nnx.Rngs(0)), nnx.Param))
    results = {}
    for impl in ("flash", "xla"):
        cfg = TrainConfig(model=dataclasses.replace(MODEL, attention=impl), seq_len=64, global_batch=2, micro_batches=1)
        logits, _ = with_params(cfg.model, params)(batch["tokens"], batch["positions"], batch["segment_ids"])
        results[impl] = logits, jax.grad(functools.partial(mean_loss, cfg, batch=batch))(params)
    (flash_logits, flash_grads), (xla_logits, xla_grads) = results["flash"], results["xla"]
    assert_close(flash_logits, xla_logits, jnp.float32)
    for g, expected in zip(jax.tree.leaves(flash_grads), jax.tree.leaves(xla_grads), strict=True):
        assert_close(g, expected, jnp.float32)


def test_flash_under_a_2x2x2_mesh_runs_per_shard_and_equals_xla():
    # A Triton call cannot be partitioned by XLA: under a mesh the kernel runs inside a shard_map.
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    batch = jax.device_put(
        {k: jnp.asarray(v) for k, v in packed_batch(8, 32, MODEL.vocab_size).items()}, batch_sharding(mesh)
    )
    results = {}
    for impl in ("flash", "xla"):
        cfg = TrainConfig(
            model=dataclasses.replace(MODEL, attention=impl),
            seq_len=32,
            global_batch=8,
            micro_batches=1,
            mesh=MeshConfig(2, 2, 2),
        )
        loss = functools.partial(mean_loss, cfg, batch=batch)
        params = init_state(cfg, mesh).params
        with activation_mesh(mesh):
            results[impl] = jax.jit(jax.value_and_grad(loss))(params), str(jax.make_jaxpr(loss)(params))
    ((flash_loss, flash_grads), flash_jaxpr), ((xla_loss, xla_grads), xla_jaxpr) = results["flash"], results["xla"]
    assert "shard_map" in flash_jaxpr and "pallas_call" in flash_jaxpr and "pallas_call" not in xla_jaxpr
    np.testing.assert_allclose(flash_loss, xla_loss, rtol=1e-6)
    for g, expected in zip(jax.tree.leaves(flash_grads), jax.tree.leaves(xla_grads), strict=True):
        assert_close(g, expected, jnp.float32)
