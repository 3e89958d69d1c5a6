"""The launchers in scripts/: the plain one starts local CPU processes that train together; the SLURM script
trains through a stand-in `srun` and passes bash's and shellcheck's checks."""

import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH, SBATCH = ROOT / "scripts" / "launch.py", ROOT / "scripts" / "train.sbatch"
SHORT = ["steps=4", "checkpoint_every=2", "seq_len=32", "global_batch=4", "micro_batches=1"]


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
    """Each process on `devices` fake CPU devices; the venv's commands on PATH, as after `. .venv/bin/activate`."""
    path = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return {**env, "PATH": path, **extra}


def rows(run: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_local_processes_train_and_checkpoint(tmp_path):
    argv = [sys.executable, str(LAUNCH), "--local", "2", "--", "--config", "configs/tiny.yaml", *SHORT]
    done = subprocess.run([*argv, f"run_dir={tmp_path / 'run'}"], env=cpu_env(2), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes joined (127.0.0.1:" in done.stderr
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4]
    assert {"2", "4"} <= {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}  # orbax also keeps step 1


def test_a_failing_process_fails_the_launch(tmp_path):
    argv = [sys.executable, str(LAUNCH), "--local", "2", "--", "--config", "configs/tiny.yaml", "optim.lr=-1"]
    done = subprocess.run(argv, env=cpu_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("mellama train: error: ") == 2, done.stderr[-3000:]


@pytest.fixture(scope="module")
def launch():
    spec = importlib.util.spec_from_file_location("launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_others_are_stopped_after_the_grace_period(launch):
    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    start = time.monotonic()
    assert launch.supervise([failing, waiting], grace=1.0) == 3
    assert waiting.returncode == -15 and time.monotonic() - start < 30  # SIGTERM, once the grace was over


def test_processes_are_numbered_and_given_their_own_gpus(launch, monkeypatch):
    monkeypatch.setattr(launch, "gpu_ids", lambda: ["0", "1", "2", "3", "4", "5", "6", "7"])
    args = launch.parse(["--hosts", "a,b", "--node-rank", "1", "--local", "4", "--", "--config", "run.yaml"])
    assert (args.coordinator, args.nodes) == ("a:8476", 2)
    (argv, env), *_, (last_argv, last_env) = launch.commands(args)
    assert argv[-5:] == ["--config", "run.yaml", "distributed.coordinator=a:8476", "distributed.num_processes=8",
                         "distributed.process_id=4"]  # fmt: skip
    assert last_argv[-1] == "distributed.process_id=7"
    assert (env["CUDA_VISIBLE_DEVICES"], last_env["CUDA_VISIBLE_DEVICES"]) == ("0,1", "6,7")
    args = launch.parse(["--", "--config", "run.yaml"])  # one process per GPU by default
    assert args.local == 8 and args.coordinator.startswith("127.0.0.1:")
    with pytest.raises(SystemExit):
        launch.parse(["--nodes", "2", "--", "--config", "run.yaml"])  # which host is this?


FAKE_SRUN = """#!/bin/bash
# stands in for srun: SLURM_NTASKS copies of the command, each with the variables srun gives a task
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def test_the_slurm_script_trains_one_process_per_task(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text(FAKE_SRUN)
    (tmp_path / "bin" / "srun").chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = cpu_env(2, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", JAX_COORDINATOR_PORT=port)
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    argv = ["bash", str(SBATCH), "configs/tiny.yaml", *SHORT, f"run_dir={tmp_path / 'run'}"]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes joined (slurm)" in done.stderr
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4]


def test_the_slurm_script_parses():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    usage = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: sbatch")


def test_the_launchers_pass_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", str(SBATCH)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
