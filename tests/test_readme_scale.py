"""README's "Training Me-LLaMA at scale", command by command, on a tiny model: convert, prepare, launch under
SLURM (a stand-in srun) and preempt, launch without SLURM and preempt, resume, export. Only `plan --device-kind`
is left to its own tests. The commands are read from the README and run as written, from a folder laid out
like the README's, with the configs/ and scripts/ of this checkout; only the scale is added."""

import json
import os
import pathlib
import random
import re
import shlex
import signal
import socket
import subprocess
import time

import pytest
from test_launch import FAKE_SRUN, ROOT, cpu_env

from mellama_jax.config import ModelConfig
from mellama_jax.hf.config import hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

RUN = "runs/me-llama-70b"
# LLaMA-2's tokenizer on a 2-layer model; 4 rows of 32 tokens per step over 2 processes of one CPU device each
TINY = ["model.preset=tiny", "seq_len=32", "global_batch=4", "micro_batches=1", "steps=auto", "checkpoint_every=4",
        "mesh.data=1", "mesh.fsdp=-1"]  # fmt: skip
WORDS = ["patient", "presented", "with", "chest", "pain", "dyspnea", "troponin", "aspirin", "heparin", "discharged"]


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Training Me-LLaMA at scale\n")[1].split("\n## ")[0]
    block = section.split("```bash\n")[1].split("```")[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def write_corpus(path: pathlib.Path, field: str, documents: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True)
    lines = (json.dumps({field: " ".join(rng.choices(WORDS, k=rng.randint(10, 40)))}) for _ in range(documents))
    path.write_text("\n".join(lines) + "\n")


def metrics(folder: pathlib.Path) -> list[dict]:
    path = folder / RUN / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def preempt(process: subprocess.Popen, folder: pathlib.Path, signal_it) -> str:
    """Waits for a step of this launch, then `signal_it()` (SIGTERM); returns the output once every process ended."""
    before, deadline = len(metrics(folder)), time.monotonic() + 300
    while len(metrics(folder)) <= before and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    signal_it()
    return process.communicate(timeout=300)[1]  # the pipe closes when the last process that holds it ends


@pytest.mark.slow  # about 90 s: three 2-process launches
def test_every_command_of_the_scale_section_runs_at_tiny_scale(tmp_path, shared_data):
    commands = readme_commands()
    assert [c.split()[0] for c in commands] == ["mellama"] * 5 + ["sbatch", "python", "sbatch", "mellama"]
    convert, *prepares, plan, sbatch, launch, resume, export = commands
    assert "--device-kind a100-80g" in plan and resume == sbatch  # plan --device-kind: tested where it is built

    # what the README starts from: LLaMA-2 in HF format, three corpora, this checkout's configs/ and scripts/
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(ModelConfig.tiny())))
    model.save_pretrained(tmp_path / "Llama-2-70b-hf")
    (tmp_path / "Llama-2-70b-hf" / "tokenizer.model").write_bytes((shared_data / "llama2_tokenizer.model").read_bytes())
    write_corpus(tmp_path / "pubmed" / "abstracts.jsonl", "text", 60, seed=0)  # 15 : 1 : 4, as the config weighs
    write_corpus(tmp_path / "mimic" / "notes.jsonl", "note", 4, seed=1)
    write_corpus(tmp_path / "redpajama" / "web.jsonl", "text", 16, seed=2)
    for folder in ("configs", "scripts"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    (tmp_path / "hosts.txt").write_text(socket.gethostname() + "\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text(FAKE_SRUN)
    (tmp_path / "bin" / "srun").chmod(0o755)
    env = cpu_env(1)
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"

    def run(command: str) -> str:
        done = subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        return done.stderr

    def start(command: str, **options) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", command], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                                **options)  # fmt: skip

    def on_slurm(command: str) -> str:  # sbatch runs the script on the first node; 2 tasks there, through srun
        slurm = f"SLURM_JOB_ID=4242 SLURM_STEP_NODELIST=localhost SLURM_NTASKS=2 JAX_COORDINATOR_PORT={free_port()}"
        return f"{slurm} bash {command.removeprefix('sbatch --nodes=20 ')} {shlex.join(TINY)}"

    run(convert)
    for command in prepares:
        run(command)
    manifest = json.loads((tmp_path / "data" / "prepared" / "clinical" / "manifest.json").read_text())
    assert manifest["documents"] == 4

    # launched under SLURM, and preempted: SLURM signals every task
    slurm = start(on_slurm(sbatch), start_new_session=True)
    err = preempt(slurm, tmp_path, lambda: os.killpg(slurm.pid, signal.SIGTERM))
    steps = int(re.search(r"steps: auto = (\d+)", err).group(1))
    first = int(re.search(r"signal 15: saved step (\d+), stopping", err).group(1))
    assert "2 processes joined (slurm)" in err and 1 <= first < steps, err[-3000:]

    # relaunched without SLURM, and preempted: the launcher passes the signal on
    launcher = start(launch.replace("scripts/launch.py", f"scripts/launch.py --local 2 --port {free_port()}")
                     + " " + shlex.join(TINY))  # fmt: skip
    err = preempt(launcher, tmp_path, lambda: launcher.send_signal(signal.SIGTERM))
    assert launcher.returncode == 0 and f"resumed {RUN} at step {first}" in err, err[-3000:]
    assert f"2 processes joined ({socket.gethostname()}:" in err
    second = int(re.search(r"signal 15: saved step (\d+), stopping", err).group(1))
    assert first < second < steps, err[-3000:]

    # resumed under SLURM to the end
    err = run(on_slurm(resume))
    assert f"resumed {RUN} at step {second}" in err, err[-3000:]
    last = metrics(tmp_path)[-1]["step"]  # `steps: auto` estimates; the mixture stops when a source runs out
    assert second < last <= steps and f"saved step {last}, stopping" in err or last == steps, err[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, last + 1))  # no step lost or repeated
    assert (tmp_path / RUN / "checkpoints" / str(last)).is_dir()

    run(export)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "me-llama-70b-hf")
    assert exported.dtype == torch.bfloat16 and exported.config.num_hidden_layers == 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "me-llama-70b-hf")
    with torch.no_grad():
        logits = exported(**tokenizer("patient given aspirin", return_tensors="pt")).logits
    assert logits.shape[-1] == 32000 and torch.isfinite(logits).all()
