"""How a run starts: from a damaged latest checkpoint (falls back), from `init_from`, and how it saves."""

import dataclasses
import json
import logging

import jax
import numpy as np
import pytest

from mellama_jax.checkpoint import restore_params, save_params, stored_arrays
from mellama_jax.config import MeshConfig, ModelConfig, OptimConfig, TrainConfig
from mellama_jax.data.synthetic import CountingBatches
from mellama_jax.errors import UserError
from mellama_jax.model.sharding import make_mesh
from mellama_jax.training.checkpoints import run_manager
from mellama_jax.training.loop import start_state, train
from mellama_jax.training.step import init_state, state_shardings

MODEL = ModelConfig.tiny(vocab_size=256, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)
CFG = TrainConfig(
    model=MODEL, seq_len=32, global_batch=8, micro_batches=2, steps=8, checkpoint_every=2, optim=OptimConfig(lr=1e-2)
)


def same_bits(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in pairs)


def metrics(run_dir) -> list[dict]:  # the run's whole history, as `train` returns it
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    cfg = dataclasses.replace(CFG, run_dir=str(tmp_path / "run"))
    straight = train(cfg)
    final = restore_params(tmp_path / "run" / "checkpoints" / "8" / "state")["params"]
    damaged = [f for f in (tmp_path / "run" / "checkpoints" / "8" / "state").rglob("*") if "ocdbt.process" in str(f)]
    for f in (f for f in damaged if f.is_file()):
        f.write_bytes(b"\0" * f.stat().st_size)  # the bytes are there, but not the data
    with caplog.at_level(logging.INFO, logger="mellama_jax"):
        again = train(cfg)
    assert "checkpoints/8 does not restore" in caplog.text and "moved to 8.unreadable" in caplog.text
    assert "at step 6" in caplog.text  # the step before
    assert (tmp_path / "run" / "checkpoints" / "8.unreadable" / "state").is_dir()  # kept, not deleted
    assert again == metrics(tmp_path / "run") and [r["step"] for r in again] == list(range(1, 9))
    assert [r["loss"] for r in again] == [r["loss"] for r in straight]  # steps 7 and 8 redone to the same bits
    assert same_bits(final, restore_params(tmp_path / "run" / "checkpoints" / "8" / "state")["params"])


def test_layer_stacks_are_saved_one_layer_per_chunk(tmp_path):
    cfg = dataclasses.replace(CFG, steps=2, run_dir=str(tmp_path / "run"))
    train(cfg)
    stored = stored_arrays(tmp_path / "run" / "checkpoints" / "2" / "state")
    gate, moment = stored["params"]["layers"]["mlp"]["gate"], stored["opt_state"][1]["mu"]["layers"]["mlp"]["gate"]
    for array in (gate, moment):
        assert array.shape[0] == MODEL.n_layers > 1 and array.store.chunk_layout.read_chunk.shape[0] == 1


def save_converted(path, model: ModelConfig, seed: int) -> dict:
    """A checkpoint laid out as `mellama convert hf-to-jax` writes it: params/ + model_config.json."""
    cfg = dataclasses.replace(CFG, model=model, seed=seed)
    params = jax.device_get(init_state(cfg, make_mesh(MeshConfig(), jax.devices()[:1])).params)
    save_params(path / "params", params)
    (path / "model_config.json").write_text(json.dumps(dataclasses.asdict(model)))
    return params


def test_init_from_a_converted_checkpoint_loads_its_params_sharded(tmp_path):
    converted = save_converted(tmp_path / "converted", MODEL, seed=7)
    cfg = dataclasses.replace(
        CFG, init_from=str(tmp_path / "converted"), run_dir=str(tmp_path / "run"), mesh=MeshConfig(2, 2, 2)
    )
    mesh = make_mesh(cfg.mesh)
    data = CountingBatches(MODEL.vocab_size, cfg.seq_len, cfg.global_batch)
    step, state = start_state(cfg, mesh, run_manager(tmp_path / "run", 2, 3), data)
    assert step == 0 and int(state.step) == 0 and same_bits(converted, state.params)
    expected = state_shardings(cfg, mesh).params
    for leaf, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    fresh = init_state(dataclasses.replace(cfg, init_from=""), mesh)
    assert same_bits(state.opt_state, fresh.opt_state)  # Adam starts from zero moments either way


def test_a_run_with_checkpoints_resumes_rather_than_reloading_init_from(tmp_path):
    save_converted(tmp_path / "converted", MODEL, seed=7)
    cfg = dataclasses.replace(CFG, steps=2, init_from=str(tmp_path / "converted"), run_dir=str(tmp_path / "run"))
    train(cfg)
    mesh = make_mesh(cfg.mesh)
    data = CountingBatches(MODEL.vocab_size, cfg.seq_len, cfg.global_batch)
    step, state = start_state(cfg, mesh, run_manager(tmp_path / "run", 2, 3), data)
    trained = restore_params(tmp_path / "run" / "checkpoints" / "2" / "state")["params"]
    assert step == 2 and data.get_state() == {"step": 2} and same_bits(trained, state.params)


def test_init_from_refusals(tmp_path):
    save_converted(tmp_path / "wider", dataclasses.replace(MODEL, ffn_dim=96), seed=0)
    cfg = dataclasses.replace(CFG, steps=2, run_dir=str(tmp_path / "run"))
    train(cfg)
    cases = {
        str(tmp_path / "wider"): r"init_from .*wider: does not fit model config",
        str(tmp_path / "missing"): r"missing: not a converted checkpoint \(params/\) or a training run",
    }
    for source, message in cases.items():
        with pytest.raises(UserError, match=message):
            train(dataclasses.replace(cfg, init_from=source, run_dir=str(tmp_path / "new")))


def test_init_from_a_training_run_starts_from_its_latest_step(tmp_path):
    """Continued SFT from a CPT run: its latest complete step's params, not its optimizer or its step."""
    train(dataclasses.replace(CFG, steps=3, checkpoint_every=2, run_dir=str(tmp_path / "cpt")))
    trained = restore_params(tmp_path / "cpt" / "checkpoints" / "3" / "state")["params"]
    cfg = dataclasses.replace(
        CFG, init_from=str(tmp_path / "cpt"), run_dir=str(tmp_path / "sft"), mesh=MeshConfig(2, 2, 2)
    )
    data = CountingBatches(MODEL.vocab_size, cfg.seq_len, cfg.global_batch)
    step, state = start_state(cfg, make_mesh(cfg.mesh), run_manager(tmp_path / "sft", 2, 3), data)
    assert step == 0 and int(state.step) == 0 and same_bits(trained, state.params)
