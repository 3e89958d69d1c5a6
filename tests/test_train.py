"""The sharded train step: mesh-independence, accumulation, non-finite skipping, shardings at 7B shape."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mellama_jax.config import MeshConfig, ModelConfig, OptimConfig, TrainConfig
from mellama_jax.errors import UserError
from mellama_jax.model.sharding import make_mesh
from mellama_jax.training.step import compile_step, init_state, state_shardings

MODEL = ModelConfig.tiny(vocab_size=128, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, init_std=0.1)
CFG = TrainConfig(
    model=MODEL, seq_len=16, global_batch=8, micro_batches=2, steps=10, optim=OptimConfig(lr=1e-2, warmup_ratio=0.2)
)
TOL = 1e-5  # fp32; only the summation order differs between meshes


def packed_batch(cfg: TrainConfig, seed: int = 0, avoid: int | None = None) -> dict:
    """Rows packed with 2-3 documents, padding at the end, a prompt part masked out of the loss."""
    rng = np.random.default_rng(seed)
    b, t = cfg.global_batch, cfg.seq_len
    tokens = rng.integers(3, cfg.model.vocab_size, (b, t))
    if avoid is not None:
        tokens[tokens == avoid] = avoid + 1
    segments, positions = np.zeros((b, t), int), np.zeros((b, t), int)
    for row in range(b):
        cuts = sorted(rng.choice(np.arange(2, t - 2), size=2, replace=False))
        bounds = [0, *cuts, t - 1]  # the last slot is padding (segment 0)
        for doc, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False), start=1):
            segments[row, start:end] = doc
            positions[row, start:end] = np.arange(end - start)
    loss_mask = (segments != 0) & (rng.random((b, t)) > 0.2)
    return {"tokens": tokens, "positions": positions, "segment_ids": segments, "loss_mask": loss_mask.astype(int)}


def run(cfg: TrainConfig, devices, batches) -> tuple[dict, list[dict]]:
    mesh = make_mesh(cfg.mesh, devices)
    state, step = init_state(cfg, mesh), compile_step(cfg, mesh)
    history = []
    for batch in batches:
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def assert_trees_close(a, b, tol=TOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=0)


def test_step_on_a_2x2x2_mesh_equals_one_device():
    batches = [packed_batch(CFG, seed) for seed in range(3)]
    sharded_cfg = dataclasses.replace(CFG, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    one, one_history = run(dataclasses.replace(CFG, mesh=MeshConfig(fsdp=1)), jax.devices()[:1], batches)
    eight, eight_history = run(sharded_cfg, jax.devices(), batches)
    for a, b in zip(one_history, eight_history, strict=True):
        assert abs(a["loss"] - b["loss"]) <= TOL and a["target_tokens"] == b["target_tokens"]
    assert one_history[-1]["loss"] < one_history[0]["loss"]  # it learns
    assert_trees_close(one.params, eight.params)
    assert_trees_close(one.opt_state, eight.opt_state)


def test_four_micro_batches_equal_one_big_batch():
    batches = [packed_batch(CFG, seed) for seed in range(2)]
    big, big_history = run(dataclasses.replace(CFG, micro_batches=1), jax.devices(), batches)
    acc, acc_history = run(dataclasses.replace(CFG, micro_batches=4), jax.devices(), batches)
    for a, b in zip(big_history, acc_history, strict=True):
        assert abs(a["loss"] - b["loss"]) <= TOL and abs(a["grad_norm"] - b["grad_norm"]) <= TOL
    assert_trees_close(big.params, acc.params)


def test_a_batch_with_non_finite_gradients_is_skipped():
    mesh = make_mesh(CFG.mesh)
    state, step = init_state(CFG, mesh), compile_step(CFG, mesh)
    poisoned = 5
    state = state.replace(params={**state.params, "embed": state.params["embed"].at[poisoned].set(jnp.nan)})
    before = jax.device_get(state)
    bad = packed_batch(CFG, 0)
    bad["tokens"][0, 3] = poisoned
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in bad.items()})
    after = jax.device_get(state)
    assert not np.isfinite(metrics["grad_norm"]) and int(metrics["skipped"]) == 1 and int(after.step) == 1
    old, new = jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((after.params, after.opt_state))
    for x, y in zip(old, new, strict=True):
        assert np.array_equal(x, y, equal_nan=True)
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in packed_batch(CFG, 1, avoid=poisoned).items()})
    assert np.isfinite(metrics["grad_norm"]) and int(metrics["skipped"]) == 1
    assert not np.array_equal(jax.device_get(state.params["lm_head"]), after.params["lm_head"])


@pytest.mark.parametrize("mesh", [MeshConfig(fsdp=8), MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(tensor=8)])
def test_every_big_parameter_and_moment_is_sharded_at_7b_shape(mesh):
    cfg = TrainConfig(model=ModelConfig.llama2_7b(), mesh=mesh)
    devices = make_mesh(mesh)
    shardings = state_shardings(cfg, devices)
    adam = shardings.opt_state[1]  # chain(clip, scale_by_adam, decay): the ScaleByAdamState
    for tree in (shardings.params, adam.mu, adam.nu):
        for path, sharding in jax.tree_util.tree_leaves_with_path(tree):
            name = jax.tree_util.keystr(path)
            assert sharding.spec != jax.sharding.PartitionSpec() or "scale" in name, name
    # The layer stack's MLP weight [32, 4096, 11008] (1.4G elements) is split over fsdp × tensor and
    # replicated over data (pure data parallelism).
    gate = shardings.params["layers"]["mlp"]["gate"]
    assert gate.shard_shape((32, 4096, 11008)) in [(32, 512, 11008), (32, 2048, 5504), (32, 4096, 1376)]
    split = devices.shape["fsdp"] * devices.shape["tensor"]
    assert math.prod(gate.shard_shape((32, 4096, 11008))) * split == 32 * 4096 * 11008


def test_bad_meshes_are_one_line_errors():
    with pytest.raises(UserError, match=r"mesh: data×fsdp×tensor = 3 does not divide the 8 devices"):
        make_mesh(MeshConfig(data=3))
    with pytest.raises(UserError, match=r"mesh: sizes must be positive, with at most one -1"):
        make_mesh(MeshConfig(data=-1, fsdp=-1))
    with pytest.raises(UserError, match=r"mesh: data×fsdp×tensor = 4 but there are 8 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
    bad = dataclasses.replace(CFG, mesh=MeshConfig(fsdp=1, tensor=8))
    message = r"sharding: layers/attn/k has a dimension of 2, which mesh axes \('tensor',\) \(8\) do not divide"
    with pytest.raises(UserError, match=message):
        state_shardings(bad, make_mesh(bad.mesh))
