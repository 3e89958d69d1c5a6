"""`mellama eval` end to end on a tiny random model: every output file, metrics recomputed from the predictions with
scikit-learn, resuming, the clean subset, refusals."""

import dataclasses
import json
import os
import pathlib
import shutil
import socket

import jax
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from mellama_jax.checkpoint import save_params
from mellama_jax.cli import main
from mellama_jax.config import ModelConfig
from mellama_jax.evaluation import harness
from mellama_jax.evaluation.tasks import MIBE, TASKS
from mellama_jax.model.llama import Llama
from mellama_jax.training.run_dir import RunLock

SYNTHETIC = pathlib.Path(__file__).parent / "data" / "mibe"
# tasks whose metrics are accuracy and macro-F1 over single labels (DESIGN §2)
SINGLE_LABEL = ("pubmedqa", "medqa", "medqa_4opt", "medmcqa", "ddi", "mtsample", "bionli", "mednli")
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_data) -> pathlib.Path:
    """A converted-checkpoint folder: a tiny random model with LLaMA-2's vocabulary and its real tokenizer."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    cfg = ModelConfig.tiny(max_seq_len=512)
    params = nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    save_params(folder / "params", jax.tree.map(np.asarray, params))
    (folder / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    shutil.copy(shared_data / "llama2_tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_data) -> pathlib.Path:
    """The shared real rows and our synthetic rows for the credentialed datasets, in one folder."""
    folder = tmp_path_factory.mktemp("mibe")
    for source in (shared_data / "medical", SYNTHETIC):
        for path in source.iterdir():
            shutil.copytree(path, folder / path.name) if path.is_dir() else shutil.copy(path, folder)
    return folder


@pytest.fixture(scope="module")
def evaluated(checkpoint, data_dir, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    argv = ["eval", str(checkpoint), "--tasks", "all", "--data-dir", str(data_dir), "--out", str(out),
            "--limit", "8", "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    return out


def rows(out: pathlib.Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]


def test_every_task_writes_predictions_results_and_a_table(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    assert set(results["tasks"]) == set(MIBE)  # "all": the MIBE tasks, not the demo's
    assert results["fingerprint"].startswith("sha256:") and results["versions"]["scikit-learn"]
    assert results["settings"]["sampling"]["max_new_tokens"] == NEW_TOKENS
    assert results["settings"]["sampling"]["temperature"] == 0 and results["settings"]["shots"] == 0
    table = (evaluated / "results.md").read_text()
    for name in MIBE:
        task, predictions = TASKS[name], rows(evaluated, name)
        assert 0 < len(predictions) <= 8 and results["tasks"][name]["n"] == len(predictions)
        assert {"id", "prompt", "output", "parsed", "parsed_strict", "gold"} <= set(predictions[0])
        assert len({r["id"] for r in predictions}) == len(predictions)
        assert f"| {task.title} |" in table
    assert "| 0.768 |" in table  # PubMedQA accuracy of Me-LLaMA-70B-chat, DESIGN §2


def test_reported_metrics_equal_sklearn_on_the_predictions_files(evaluated, data_dir):
    results = json.loads((evaluated / "results.json").read_text())
    for name in SINGLE_LABEL:
        predictions = rows(evaluated, name)
        gold, paper, strict = ([r[k] for r in predictions] for k in ("gold", "parsed", "parsed_strict"))
        reported = results["tasks"][name]
        for parsed, key in ((paper, "paper_parser"), (strict, "strict_parser")):
            assert reported[key]["accuracy" if "accuracy" in reported[key] else "macro_f1"] is not None
            if "accuracy" in reported[key]:
                assert reported[key]["accuracy"] == pytest.approx(accuracy_score(gold, parsed), abs=1e-12), name
            expected = f1_score(gold, parsed, average="macro", labels=sorted(set(gold)), zero_division=0)
            assert reported[key]["macro_f1"] == pytest.approx(expected, abs=1e-12), name
    hoc, choices = rows(evaluated, "hoc"), TASKS["hoc"].load(data_dir, 1)[0].choices  # parsed: multi-hot over choices
    binarizer = MultiLabelBinarizer(classes=list(choices))
    golds = binarizer.fit_transform([r["gold"] for r in hoc])
    expected = f1_score(golds, [r["parsed"] for r in hoc], average="macro", zero_division=0)
    assert results["tasks"]["hoc"]["paper_parser"]["macro_f1"] == pytest.approx(expected, abs=1e-12)


def test_a_rerun_reuses_finished_tasks_and_other_settings_are_refused(evaluated, checkpoint, data_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (evaluated / "predictions").iterdir()}
    base = ["eval", str(checkpoint), "--data-dir", str(data_dir), "--out", str(evaluated), "--limit", "8",
            "--max-new-tokens", str(NEW_TOKENS)]  # fmt: skip
    assert main([*base, "--tasks", "pubmedqa,ddi"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (evaluated / "predictions").iterdir()} == before
    assert set(json.loads((evaluated / "results.json").read_text())["tasks"]) == set(MIBE)  # earlier tasks kept
    capsys.readouterr()
    assert main([*base[:-1], str(NEW_TOKENS + 1), "--tasks", "pubmedqa"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings" in err and "--overwrite" in err
    assert main([*base, "--tasks", "pubmedqa", "--dtype", "bfloat16"]) == 2  # other numbers: not the same outputs
    assert "other settings" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (evaluated / "predictions").iterdir()} == before


def test_exclude_contaminated_scores_the_clean_subset_beside_the_full_one(checkpoint, data_dir, tmp_path):
    examples = TASKS["pubmedqa"].load(data_dir, 6)
    corpus = tmp_path / "corpus.jsonl"  # two examples' abstracts inside training documents
    corpus.write_text("".join(json.dumps({"text": f"Background. {e.text} More text."}) + "\n" for e in examples[1:3]))
    report = tmp_path / "report.json"
    argv = ["decontaminate", "--data", str(corpus), "--tasks", "pubmedqa", "--data-dir", str(data_dir),
            "--limit", "6", "--out", str(report)]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "out"
    argv = ["eval", str(checkpoint), "--tasks", "pubmedqa", "--data-dir", str(data_dir), "--out", str(out),
            "--limit", "6", "--max-new-tokens", "2", "--exclude-contaminated", str(report)]  # fmt: skip
    assert main(argv) == 0
    entry = json.loads((out / "results.json").read_text())["tasks"]["pubmedqa"]
    assert entry["clean"]["n"] == 4 and entry["clean"]["excluded"] == 2 and entry["clean"]["report"] == str(report)
    kept = [r for r in rows(out, "pubmedqa") if r["id"] not in {e.id for e in examples[1:3]}]
    accuracy = accuracy_score([r["gold"] for r in kept], [r["parsed"] for r in kept])
    assert entry["clean"]["paper_parser"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (["--tasks", "pubmedqa,nosuch"], "nosuch"),
        (["--data-dir", "/nonexistent/mibe"], "/nonexistent/mibe"),
        (["--out", "results.json"], "names a folder"),
        (["--limit", "0"], "--limit"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-new-tokens", "511"], "leaves no room for a prompt in the model's 512 positions"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_the_model_loads(checkpoint, data_dir, tmp_path, capsys, change,
                                                                  message):  # fmt: skip
    argv = {"--tasks": "pubmedqa", "--data-dir": str(data_dir), "--out": str(tmp_path / "out")}
    flags = dict(zip(change[::2], change[1::2], strict=True))
    args = ["eval", str(checkpoint)] + [x for k, v in {**argv, **flags}.items() for x in (k, v)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (tmp_path / "out").exists()


def test_a_folder_of_something_else_is_not_written_into(checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["eval", str(checkpoint), "--tasks", "ddi", "--data-dir", str(data_dir), "--out", str(out)]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_all_skips_the_tasks_whose_data_is_absent_and_a_named_one_is_an_error(checkpoint, shared_data, tmp_path,
                                                                              capsys):  # fmt: skip
    out = tmp_path / "out"
    argv = ["eval", str(checkpoint), "--data-dir", str(shared_data / "medical"), "--limit", "2", "--max-new-tokens",
            "2", "--out", str(out)]  # fmt: skip
    assert main([*argv, "--tasks", "all"]) == 0
    err = capsys.readouterr().err
    assert "emrqa: no file in" in err and "mednli: no file in" in err
    assert set(json.loads((out / "results.json").read_text())["tasks"]) == {
        "pubmedqa", "medqa", "medqa_4opt", "medmcqa", "ddi", "hoc"}  # fmt: skip
    assert main([*argv, "--tasks", "pubmedqa,emrqa"]) == 2
    assert "emrqa: no data file in" in capsys.readouterr().err


def test_a_run_killed_before_its_first_task_finished_is_resumed(checkpoint, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()  # killed while loading the model: only its lock is left
    (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1, "started": "t"}))
    argv = ["eval", str(checkpoint), "--tasks", "pubmedqa,ddi", "--data-dir", str(data_dir), "--out", str(out),
            "--limit", "2", "--max-new-tokens", "2"]  # fmt: skip

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "_run_task", killed)  # killed during the first task
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert json.loads((out / "results.json").read_text())["tasks"] == {}
    monkeypatch.undo()
    assert main(argv) == 0
    assert set(json.loads((out / "results.json").read_text())["tasks"]) == {"pubmedqa", "ddi"}


def test_a_second_eval_into_the_same_folder_is_told_about_the_first(checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = RunLock(out, "mellama eval writes this folder")
    lock.acquire()  # the first eval, still loading its model: its folder holds only the lock
    try:
        argv = ["eval", str(checkpoint), "--tasks", "ddi", "--data-dir", str(data_dir), "--out", str(out)]
        assert main(argv) == 2
    finally:
        lock.release()
    assert f"{out}: another mellama eval writes this folder (pid {os.getpid()}" in capsys.readouterr().err


def test_a_contamination_report_of_other_data_is_refused(checkpoint, data_dir, tmp_path, capsys):
    report, other, corpus = tmp_path / "report.json", tmp_path / "other", tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "a training document"}) + "\n")
    argv = ["decontaminate", "--data", str(corpus), "--tasks", "pubmedqa",
            "--data-dir", str(data_dir), "--out", str(report), "--workers", "1"]  # fmt: skip
    assert main(argv) == 0
    other.mkdir()  # other rows under the same ids would be scored as clean or not by the wrong examples
    lines = (data_dir / "pubmedqa_pqal.sample40.jsonl").read_text().splitlines(keepends=True)
    (other / "pubmedqa.jsonl").write_text("".join(lines[5:]))
    argv = ["eval", str(checkpoint), "--tasks", "pubmedqa", "--data-dir", str(other), "--out", str(tmp_path / "out"),
            "--exclude-contaminated", str(report)]  # fmt: skip
    assert main(argv) == 2
    assert f"{report}: checked another pubmedqa file than {other / 'pubmedqa.jsonl'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
