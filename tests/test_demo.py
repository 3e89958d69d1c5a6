"""`mellama demo`, shrunken: the held-out facts are learnt (above chance by a stated margin), the HF exports reproduce
our greedy outputs in transformers and peft, a re-run resumes, a kill -9 loses nothing, and a changed setting or a
foreign folder is refused."""

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_quiet_host import mellama

from mellama_jax.cli import main
from mellama_jax.demo.pipeline import DemoSettings, chance, run_demo
from mellama_jax.errors import UserError

# The default demo, the README's: about 3 min on 2 idle cores.
DEFAULT = DemoSettings()
# Measured after SFT (seeds 0 / 1 / 2): MC 0.97 / 0.93 / 0.97, short answer 1.00 / 1.00 / 1.00 (chance 0.25 and
# 0.11); yes/no 0.63 / 0.50 / 0.62 (chance 0.50) is not asserted. Asserted: MC and short answer each at least
# MARGIN above chance. Before CPT the random model names no choice.
MARGIN = 0.15
TINY = DemoSettings(corpus_tokens=20_000, d_model=64, n_layers=2, ffn_dim=128, seq_len=128, cpt_steps=60,
                    cpt_batch=8, sft_steps=10, sft_batch=8, max_new_tokens=8)  # fmt: skip  # runs, learns nothing


def accuracy(out, stage: str, task: str) -> float:
    results = json.loads((out / "eval" / stage / "results.json").read_text())
    return results["tasks"][task]["paper_parser"]["accuracy"]


@pytest.mark.slow
def test_the_demo_learns_the_held_out_facts_exports_resumes_and_refuses_other_settings(tmp_path):
    out = tmp_path / "demo"
    done = mellama("demo", "--out", out)  # the README's command, in a user's environment
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    said = [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("[demo]")]
    assert said == [f"[demo] {s}" for s in
                    ("data", "base", "eval base", "cpt", "eval cpt", "sft", "eval sft", "export", "check")]  # fmt: skip
    text = (out / "summary.md").read_text()
    assert text in done.stdout and "demo done in " in done.stdout
    for task in ("demo_mc", "demo_short"):
        level = chance(out / "data" / "eval" / f"{task}.jsonl")
        assert accuracy(out, "base", task) <= level
        assert accuracy(out, "sft", task) >= level + MARGIN, task
    assert "| Demo short answer (held-out facts) | 30 | 0.112 |" in text
    for run in ("cpt", "sft"):
        assert (out / "runs" / run / "loss.png").is_file() and any((out / "runs" / run / "tensorboard").iterdir())

    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None:
        assert "Hugging Face check: skipped" in text or "peft is not installed" in text
    else:
        assert "transformers reproduced 120/120 greedy outputs of ours (hf/sft)" in text
        assert "peft (hf/cpt + hf/sft-adapter) 120/120" in text
        config = json.loads((out / "hf" / "sft-adapter" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (DEFAULT.lora_rank, DEFAULT.lora_alpha)

    metrics = {run: (out / "runs" / run / "metrics.jsonl").read_bytes() for run in ("cpt", "sft")}
    again = mellama("demo", "--out", out)  # resumes: every stage is found done
    assert again.returncode == 0, again.stderr[-2000:]
    assert not any(line.startswith(("[demo] data", "[demo] base")) for line in again.stdout.splitlines())
    assert {run: (out / "runs" / run / "metrics.jsonl").read_bytes() for run in metrics} == metrics  # no step redone
    assert text.split("Seconds per stage")[0] in again.stdout

    with pytest.raises(UserError, match=r"other settings \(cpt_steps\)"):
        run_demo(out, dataclasses.replace(DEFAULT, cpt_steps=DEFAULT.cpt_steps + 1))


def test_a_foreign_folder_or_a_file_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(UserError, match="holds something other than a demo"):
        run_demo(tmp_path, TINY)
    assert (tmp_path / "mine.txt").read_text() == "a user's file"
    assert main(["demo", "--out", str(tmp_path / "mine.txt")]) != 0
    assert (tmp_path / "mine.txt").read_text() == "a user's file"


KILLED = """
import sys
from mellama_jax.demo.pipeline import DemoSettings, run_demo
run_demo(sys.argv[1], DemoSettings(**eval(sys.argv[2])))
"""


@pytest.mark.slow
def test_a_kill_during_training_then_a_rerun_gives_the_same_demo(tmp_path):
    straight = run_demo(tmp_path / "straight", TINY, lambda _: None)
    killed = tmp_path / "killed"
    args = [sys.executable, "-c", KILLED, str(killed), repr(dataclasses.asdict(TINY))]
    # kill -9 once the CPT run has a checkpoint: mid-training, with data/, base/ and eval/base/ written
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((killed / "runs" / "cpt" / "checkpoints").glob("[0-9]*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "runs" / "cpt" / "checkpoints" / str(TINY.cpt_steps)).exists()  # killed mid-training
    again = run_demo(killed, TINY, lambda _: None)
    scores = lambda text: text.split("\nAccuracy")[0]  # noqa: E731
    assert scores(again) == scores(straight)  # training resumes bit for bit: the same outputs, the same scores
