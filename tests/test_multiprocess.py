"""Multi-process training: 2 processes × 2 CPU devices (gloo collectives) match 1 process × 4 devices."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mellama_jax.checkpoint import restore_params
from mellama_jax.config import DistributedConfig
from mellama_jax.errors import UserError
from mellama_jax.training.distributed import initialize, launcher

CONFIG = """
model: {preset: tiny, vocab_size: 256, d_model: 32, n_heads: 4, n_kv_heads: 2, head_dim: 8, ffn_dim: 64}
seq_len: 32
global_batch: 8
micro_batches: 2
steps: 3
checkpoint_every: 3
optim: {lr: 1.0e-2, warmup_ratio: 0.0}
mesh: {data: 1, fsdp: 2, tensor: 2}
"""
TOL = 1e-5  # fp32; the processes' all-reduce may add in another order than one process does


def launch(tmp_path, run: str, devices: int, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "mellama_jax.cli", "train", "--config", str(tmp_path / "run.yaml")]
    argv += [f"run_dir={tmp_path / run}", *overrides]
    return subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(tmp_path, run: str):
    rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    return rows, restore_params(tmp_path / run / "checkpoints" / "3" / "state")["params"]


def test_two_processes_of_two_devices_match_one_process_of_four(tmp_path):
    (tmp_path / "run.yaml").write_text(CONFIG)
    port = free_port()
    joined = [f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2"]
    processes = [launch(tmp_path, "one", 4)]
    processes += [launch(tmp_path, "two", 2, *joined, f"distributed.process_id={i}") for i in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    for process, err in zip(processes, errors, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert "2 processes joined" in errors[1] and not errors[2].strip()  # only process 0 speaks
    one_rows, one_params = results(tmp_path, "one")
    two_rows, two_params = results(tmp_path, "two")
    assert [r["step"] for r in two_rows] == [1, 2, 3]
    for a, b in zip(one_rows, two_rows, strict=True):
        assert abs(a["loss"] - b["loss"]) <= TOL and abs(a["grad_norm"] - b["grad_norm"]) <= TOL
    assert two_rows[-1]["loss"] < two_rows[0]["loss"]
    for a, b in zip(jax.tree.leaves(one_params), jax.tree.leaves(two_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("cfg", "env", "message"),
    [
        (DistributedConfig(num_processes=2), {}, r"distributed: num_processes=2 needs a coordinator"),
        (DistributedConfig(coordinator="h:1"), {}, r"distributed: coordinator h:1 needs num_processes and process_id"),
        (DistributedConfig(coordinator="h:1", num_processes=2, process_id=2), {}, r"need 0 <= process_id < num_pro"),
        (DistributedConfig(coordinator="h:1"), {"JAX_NUM_PROCESSES": "two"}, r"env JAX_NUM_PROCESSES: expected an int"),
    ],
)
def test_incomplete_distributed_settings_are_one_line_errors(monkeypatch, cfg, env, message):
    unset = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri")
    for name in unset:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=message):
        initialize(cfg)


def test_launchers_are_detected_only_with_more_than_one_task(monkeypatch):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OMPI_MCA_orte_hnp_uri", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert launcher() is None  # an interactive allocation with one task: a single-process run
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert launcher() == "slurm"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.0.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launcher() == "openmpi"


def test_each_process_resumes_its_own_shard_of_a_cpt_corpus(tmp_path, shared_data):
    from mellama_jax.data.prepare import prepare

    words = np.asarray(["patient", "given", "insulin", "metformin", "for", "diabetes", "control"])
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, rng.integers(5, 80))) for _ in range(80)]
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = shared_data / "llama2_tokenizer.model"
    prepare([str(tmp_path / "notes.jsonl")], str(tokenizer), tmp_path / "prepared", workers=1)
    (tmp_path / "run.yaml").write_text(
        CONFIG.replace("vocab_size: 256", "vocab_size: 32000")
        .replace("steps: 3", "steps: 4")
        .replace("checkpoint_every: 3", "checkpoint_every: 2")
        + f"data: {{kind: cpt, tokenizer: {tokenizer}, sources: [{{name: notes, paths: [{tmp_path / 'prepared'}],"
        + " format: prepared}]}\n"
    )

    def two_processes() -> list[dict]:
        joined = [f"distributed.coordinator=127.0.0.1:{free_port()}", "distributed.num_processes=2"]
        processes = [launch(tmp_path, "run", 2, *joined, f"distributed.process_id={i}") for i in range(2)]
        for process, err in [(p, p.communicate(timeout=300)[1]) for p in processes]:
            assert process.returncode == 0, err[-3000:]
        return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    straight = two_processes()
    data = tmp_path / "run" / "checkpoints" / "2" / "data"
    states = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states[0] != states[1]  # each process is somewhere else in its own shard
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # lost: both processes go back to step 2
    resumed = two_processes()
    same = lambda rows: [(r["step"], r["loss"], r["grad_norm"]) for r in rows]  # noqa: E731
    assert same(resumed) == same(straight) and len(straight) == 4
    alone = launch(tmp_path, "run", 4, "steps=6")  # one process cannot take over two processes' positions
    _, err = alone.communicate(timeout=300)
    assert alone.returncode == 2 and "written by 2 processes" in err


def test_a_relaunch_after_one_shard_ended_exits_cleanly_on_every_process(tmp_path, shared_data):
    from mellama_jax.data.prepare import prepare

    # two documents, one per process: one shard ends after a step, the other has batches left
    texts = ["aspirin for fever", " ".join(["patient reports chest pain after exercise"] * 60)]
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = shared_data / "llama2_tokenizer.model"
    prepare([str(tmp_path / "notes.jsonl")], str(tokenizer), tmp_path / "prepared", workers=1)
    (tmp_path / "run.yaml").write_text(
        CONFIG.replace("vocab_size: 256", "vocab_size: 32000").replace("steps: 3", "steps: 50")
        + f"data: {{kind: cpt, epochs: 1, sources: [{{name: notes, paths: [{tmp_path / 'prepared'}],"
        + " format: prepared}]}\n"
    )

    def two_processes() -> list[str]:
        joined = [f"distributed.coordinator=127.0.0.1:{free_port()}", "distributed.num_processes=2"]
        processes = [launch(tmp_path, "run", 2, *joined, f"distributed.process_id={i}") for i in range(2)]
        errors = []
        for process in processes:
            try:
                errors.append(process.communicate(timeout=120)[1])
            except subprocess.TimeoutExpired:
                for p in processes:
                    p.kill()
                pytest.fail("a process waits forever for the other")
            assert process.returncode == 0, errors[-1][-3000:]
        return errors

    first = two_processes()
    assert "the data ended: saved step 1, stopping" in first[0]
    data = tmp_path / "run" / "checkpoints" / "1" / "data"
    done = [json.loads((data / f"process_{i}-of-2.json").read_text())["done"] for i in range(2)]
    assert sorted(done) == [False, True]  # one shard has ended, the other has not
    again = two_processes()
    assert "the data ended at step 1; nothing left to train on" in again[0]


def test_two_processes_fall_back_together_from_a_damaged_checkpoint(tmp_path):
    (tmp_path / "run.yaml").write_text(
        CONFIG.replace("steps: 3", "steps: 4").replace("checkpoint_every: 3", "checkpoint_every: 2")
    )

    def two_processes() -> list[str]:
        joined = [f"distributed.coordinator=127.0.0.1:{free_port()}", "distributed.num_processes=2"]
        processes = [launch(tmp_path, "run", 2, *joined, f"distributed.process_id={i}") for i in range(2)]
        errors = [p.communicate(timeout=300)[1] for p in processes]
        for process, err in zip(processes, errors, strict=True):
            assert process.returncode == 0, err[-3000:]
        return errors

    two_processes()
    straight = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    state = tmp_path / "run" / "checkpoints" / "4" / "state"
    for f in (f for f in state.rglob("*") if "ocdbt.process" in str(f) and f.is_file()):
        f.write_bytes(b"\0" * f.stat().st_size)
    errors = two_processes()
    assert "moved to 4.unreadable" in errors[0] and (tmp_path / "run" / "checkpoints" / "4.unreadable").is_dir()
    resumed = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    same = lambda rows: [(r["step"], r["loss"], r["grad_norm"]) for r in rows]  # noqa: E731
    assert same(resumed) == same(straight)  # both processes went back to step 2 and redid 3 and 4 alike


def test_a_bad_record_in_one_process_shard_stops_both_processes(tmp_path, shared_data):
    good = json.dumps({"text": " ".join(["patient reports chest pain after exercise"] * 30)})
    (tmp_path / "notes.jsonl").write_text(good + "\n" + '{"text": "cut off\n')  # one document each; one is bad
    tokenizer = shared_data / "llama2_tokenizer.model"
    (tmp_path / "run.yaml").write_text(
        CONFIG.replace("vocab_size: 256", "vocab_size: 32000")
        + f"data: {{kind: cpt, tokenizer: {tokenizer},"
        + f" sources: [{{name: notes, paths: [{tmp_path / 'notes.jsonl'}]}}]}}\n"
    )
    joined = [f"distributed.coordinator=127.0.0.1:{free_port()}", "distributed.num_processes=2"]
    processes = [launch(tmp_path, "run", 2, *joined, f"distributed.process_id={i}") for i in range(2)]
    try:
        errors = [p.communicate(timeout=120)[1] for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        pytest.fail("one process waits forever for the other")
    assert [p.returncode for p in processes] == [2, 2]
    assert any("notes.jsonl:2: invalid JSON" in err for err in errors)
    assert any("another process stopped the run" in err for err in errors)
