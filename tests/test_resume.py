"""`mellama train` as a real subprocess: kill -9 or SIGTERM, restart, and the run continues bit for bit."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mellama_jax.checkpoint import restore_params

STEPS = 40
CONFIG = f"""
model: {{preset: tiny, vocab_size: 256, d_model: 32, n_heads: 4, n_kv_heads: 2, head_dim: 8, ffn_dim: 64}}
seq_len: 32
global_batch: 4
micro_batches: 2
steps: {STEPS}
checkpoint_every: 2
keep_checkpoints: 3
optim: {{lr: 1.0e-2}}
"""


def start(tmp_path, run: str) -> subprocess.Popen:
    (tmp_path / "run.yaml").write_text(CONFIG)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "mellama_jax.cli", "train", "--config", str(tmp_path / "run.yaml")]
    return subprocess.Popen([*argv, f"run_dir={tmp_path / run}"], env=env, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]


def wait_for_checkpoint(tmp_path, run: str, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        folder = tmp_path / run / "checkpoints"
        if folder.is_dir() and any(s >= step for s in ocp.utils.checkpoint_steps(folder)):
            return
        time.sleep(0.01)
    pytest.fail(f"{run} never wrote checkpoint {step} (exit {process.poll()})")


def history(tmp_path, run: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]


def final_params(tmp_path, run: str):
    return restore_params(tmp_path / run / "checkpoints" / str(STEPS) / "state")["params"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    finish(start(tmp_path, "a"))
    return history(tmp_path, "a"), final_params(tmp_path, "a")


def assert_same_run(tmp_path, run: str, straight) -> None:
    rows, params = straight
    resumed = history(tmp_path, run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in resumed] == [
        (r["loss"], r["grad_norm"], r["lr"]) for r in rows
    ]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final_params(tmp_path, run)), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_kill_9_then_restart_continues_bit_for_bit(tmp_path, straight):
    rows, _ = straight
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # the run really learns
    process = start(tmp_path, "b")
    wait_for_checkpoint(tmp_path, "b", 4, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = max(ocp.utils.checkpoint_steps(tmp_path / "b" / "checkpoints"))
    assert killed_at < STEPS  # it really died mid-run
    finish(start(tmp_path, "b"))
    assert_same_run(tmp_path, "b", straight)


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, straight):
    process = start(tmp_path, "c")
    wait_for_checkpoint(tmp_path, "c", 2, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    stopped = max(ocp.utils.checkpoint_steps(tmp_path / "c" / "checkpoints"))
    assert stopped < STEPS and f"saved step {stopped}, stopping" in err
    assert len(history(tmp_path, "c")) == stopped  # the log ends where the checkpoint does
    finish(start(tmp_path, "c"))
    assert_same_run(tmp_path, "c", straight)


def test_shipped_tiny_config_trains_and_writes_its_outputs(tmp_path):
    from mellama_jax.cli import main

    tiny = pathlib.Path(__file__).parents[1] / "configs" / "tiny.yaml"
    assert main(["train", "--config", str(tiny), f"run_dir={tmp_path / 'run'}"]) == 0
    run = tmp_path / "run"
    rows = history(tmp_path, "run")
    assert len(rows) == 80 and {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= rows[0].keys()
    assert np.mean([r["loss"] for r in rows[-10:]]) < np.mean([r["loss"] for r in rows[:10]]) - 1.0
    assert (run / "loss.png").stat().st_size > 10_000 and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(ocp.utils.checkpoint_steps(run / "checkpoints")) == [40, 60, 80]  # every 20, the last 3 kept
