"""A run never loses progress: mismatched resumes refused, one writer per run, metrics that survive kills."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mellama_jax.cli import main
from mellama_jax.training.run_dir import STALE_AFTER, RunLock

CONFIG = """
model: {preset: tiny, vocab_size: 256, d_model: 32, n_heads: 4, n_kv_heads: 2, head_dim: 8, ffn_dim: 64}
seq_len: 32
global_batch: 8
micro_batches: 2
steps: 4
checkpoint_every: 2
optim: {lr: 1.0e-2}
"""


def train(tmp_path, capsys, *overrides: str) -> tuple[int, str]:
    (tmp_path / "run.yaml").write_text(CONFIG)
    code = main(["train", "--config", str(tmp_path / "run.yaml"), f"run_dir={tmp_path / 'run'}", *overrides])
    return code, capsys.readouterr().err


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"/" for p in sorted(folder.rglob("*"))}


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "change", ["model.n_layers=3", "model.ffn_dim=128", "model.d_model=48", "model.rope_theta=500000"]
)
def test_resuming_with_another_model_is_refused_and_the_run_is_untouched(tmp_path, capsys, change):
    assert train(tmp_path, capsys)[0] == 0
    before = snapshot(tmp_path / "run")
    code, err = train(tmp_path, capsys, change, "steps=6")
    assert code == 2
    field = change.split("=")[0]
    assert f"cannot resume with a different model: {field}=" in error_line(err)
    assert snapshot(tmp_path / "run") == before  # nothing renamed, emptied or overwritten


def test_a_saved_state_of_other_shapes_is_refused_even_without_model_config(tmp_path, capsys):
    assert train(tmp_path, capsys)[0] == 0
    (tmp_path / "run" / "model_config.json").unlink()  # an older run, or one whose file was lost
    before = snapshot(tmp_path / "run")
    code, err = train(tmp_path, capsys, "model.n_layers=3", "steps=6")
    assert code == 2 and (
        "the saved state has shape (2, 32, 2, 8) at params/layers/attn/k, this config needs shape (3, 32, 2, 8)"
    ) in error_line(err)
    assert snapshot(tmp_path / "run") == before


def test_compute_settings_may_change_on_resume(tmp_path, capsys):
    assert train(tmp_path, capsys)[0] == 0
    code, err = train(tmp_path, capsys, "model.remat=full", "steps=6")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_a_converted_checkpoint_is_not_a_run_dir(tmp_path, capsys):
    (tmp_path / "run" / "params").mkdir(parents=True)
    (tmp_path / "run" / "model_config.json").write_text("{}")
    code, err = train(tmp_path, capsys)
    assert code == 2 and "is a converted checkpoint, not a run; use it as init_from" in error_line(err)
    (tmp_path / "file").write_text("x")
    code, err = train(tmp_path, capsys, f"run_dir={tmp_path / 'file'}")
    assert code == 2 and "exists and is not a folder" in error_line(err)


def start(tmp_path, *overrides: str) -> subprocess.Popen:
    (tmp_path / "run.yaml").write_text(CONFIG)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "mellama_jax.cli", "train", "--config", str(tmp_path / "run.yaml")]
    return subprocess.Popen(
        [*argv, f"run_dir={tmp_path / 'run'}", *overrides], env=env, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return
        time.sleep(0.02)
    pytest.fail(f"never saw {what} (exit {process.poll()})")


def steps_saved(tmp_path) -> list[int]:
    folder = tmp_path / "run" / "checkpoints"
    return ocp.utils.checkpoint_steps(folder) if folder.is_dir() else []


def test_a_second_writer_is_refused_and_the_first_finishes_cleanly(tmp_path, capsys):
    first = start(tmp_path, "steps=100")  # long enough to be running still when the second one starts
    wait_for(lambda: (tmp_path / "run" / "loss.png").is_file(), first, "loss.png")
    assert first.poll() is None and max(steps_saved(tmp_path)) < 100  # drawn at a checkpoint, not only at the end
    code, err = train(tmp_path, capsys, "steps=40")
    assert code == 2
    assert f"another mellama train writes this run (pid {first.pid} on {socket.gethostname()}" in error_line(err)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 101))
    assert "tensorboard --logdir" in first_err and "mfu" not in first_err  # no peak FLOPs known on CPU
    assert not (tmp_path / "run" / "run.lock").exists()  # released at the end


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    process = start(tmp_path, "steps=40")
    wait_for(lambda: steps_saved(tmp_path), process, "a first checkpoint")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert json.loads((tmp_path / "run" / "run.lock").read_text())["pid"] == process.pid  # left behind
    code, err = train(tmp_path, capsys, "steps=6")
    assert code == 0, err
    assert f"taking over a stale lock (pid {process.pid} on {socket.gethostname()}" in err


def test_a_lock_from_another_host_is_refused_until_its_heartbeat_stops(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    holder = {"host": "gpu-node-17", "pid": 4242, "started": "2026-11-20T08:00:00"}
    lock = tmp_path / "run" / "run.lock"
    lock.write_text(json.dumps(holder))
    code, err = train(tmp_path, capsys)
    assert code == 2 and "held by pid 4242 on gpu-node-17, started 2026-11-20T08:00:00" in error_line(err)
    silent = time.time() - STALE_AFTER - 1
    os.utime(lock, (silent, silent))  # a restarted container has a new hostname: the old lock goes quiet
    code, err = train(tmp_path, capsys)
    assert code == 0 and "taking over a stale lock (pid 4242 on gpu-node-17" in err


def test_the_lock_holder_keeps_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr("mellama_jax.training.run_dir.HEARTBEAT", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        first = (tmp_path / "run.lock").stat().st_mtime_ns
        time.sleep(0.3)
        assert (tmp_path / "run.lock").stat().st_mtime_ns > first
    finally:
        lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_a_torn_metrics_line_is_dropped_and_the_history_kept(tmp_path, capsys):
    assert train(tmp_path, capsys)[0] == 0
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:], '{"step": 5, "lo']))  # a kill mid-write
    code, err = train(tmp_path, capsys, "steps=6")
    assert code == 0, err
    assert "metrics.jsonl:2: not a metrics row" in err and "metrics.jsonl:6: not a metrics row" in err
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(line) for line in lines] == rows[:4]  # the earlier history, unchanged


def test_tensorboard_has_one_event_file_and_drops_redone_steps(tmp_path, capsys):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    assert train(tmp_path, capsys)[0] == 0
    ocp_dir = tmp_path / "run" / "checkpoints"
    for step in ocp.utils.checkpoint_steps(ocp_dir):
        if step > 2:
            shutil.rmtree(ocp_dir / str(step))  # the last checkpoint lost: steps 3 and 4 are redone
    events = tmp_path / "run" / "tensorboard"
    (file,) = events.iterdir()
    with open(file, "ab") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00\x01\x02")  # a record torn by a kill
    assert train(tmp_path, capsys, "steps=5", "optim.lr=0.02")[0] == 0
    assert list(events.iterdir()) == [file]
    reader = event_accumulator.EventAccumulator(str(file))
    reader.Reload()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars = reader.Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2, 3, 4, 5]  # 3 and 4 once each: the redone ones
    np.testing.assert_allclose([s.value for s in scalars], [r["loss"] for r in rows], rtol=1e-6)


def test_a_damaged_checkpoint_falls_back_without_library_noise(tmp_path, capsys):
    assert train(tmp_path, capsys)[0] == 0
    state = tmp_path / "run" / "checkpoints" / "4" / "state"
    for f in (f for f in state.rglob("*") if "ocdbt.process" in str(f) and f.is_file()):
        f.write_bytes(b"\0" * f.stat().st_size)  # the bytes are there, but not the data
    process = start(tmp_path, "steps=6")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert "checkpoints/4 does not restore" in err and "moved to 4.unreadable" in err
    for noise in ("Traceback", "Event loop is closed", "Exception ignored", "ERROR:"):
        assert noise not in err, err[-3000:]


def test_a_missing_init_from_is_refused_before_run_dir_is_made(tmp_path, capsys):
    code, err = train(tmp_path, capsys, f"init_from={tmp_path / 'nothere'}")
    assert code == 2 and f"init_from {tmp_path / 'nothere'}: not a converted checkpoint" in error_line(err)
    assert not (tmp_path / "run").exists()
    code, err = train(tmp_path, capsys, "run_dir=''")
    assert code == 2 and "override \"run_dir=''\": run_dir must name a folder" in error_line(err)


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.5])
def test_a_kill_9_early_in_a_resumed_run_keeps_the_history_whole(tmp_path, capsys, delay):
    assert train(tmp_path, capsys)[0] == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    process = start(tmp_path, "steps=40")
    wait_for(lambda: (tmp_path / "run" / "run.lock").is_file(), process, "the run's lock")
    time.sleep(delay)  # after the lock: restore, the metrics rewrite, compilation, the first steps
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    after = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert after.startswith(before)  # nothing of the checkpointed history is lost
    steps = [json.loads(line)["step"] for line in after.splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # and no gap


def test_when_no_checkpoint_restores_nothing_is_moved_aside(tmp_path, capsys):
    assert train(tmp_path, capsys)[0] == 0
    for state in (tmp_path / "run" / "checkpoints").glob("*/state"):  # every step, as a machine fault would
        for f in (f for f in state.rglob("*") if "ocdbt.process" in str(f) and f.is_file()):
            f.write_bytes(b"\0" * f.stat().st_size)
    before = snapshot(tmp_path / "run")
    code, err = train(tmp_path, capsys, "steps=6")
    assert code == 2 and "no checkpoint restores (step 4: " in error_line(err) and "nothing was moved aside" in err
    assert snapshot(tmp_path / "run") == before  # the history is not wiped by a fresh start


def test_a_zero_filled_tail_of_the_event_file_is_cut_before_appending(tmp_path, capsys):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    assert train(tmp_path, capsys)[0] == 0
    (file,) = (tmp_path / "run" / "tensorboard").iterdir()
    with open(file, "ab") as f:
        f.write(b"\0" * 64)  # what a power loss can leave: parses as records of length 0, with wrong CRCs
    assert train(tmp_path, capsys, "steps=6")[0] == 0
    reader = event_accumulator.EventAccumulator(str(file))
    reader.Reload()
    assert [s.step for s in reader.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
