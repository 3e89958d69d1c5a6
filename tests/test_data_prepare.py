"""`mellama prepare` and CPT training on real tokenizer output (LLaMA-2's SentencePiece model from ../shared)."""

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm
from array_record.python.array_record_data_source import ArrayRecordDataSource

import mellama_jax
from mellama_jax.cli import main

WORDS = ["patient", "presents", "with", "fever", "cough", "dyspnea", "hypertension", "insulin", "metformin", "biopsy"]


def notes(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(5, 60))).capitalize() + "." for _ in range(n)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def tokenizer(shared_data):
    return str(shared_data / "llama2_tokenizer.model")


def test_prepare_matches_sentencepiece_and_counts_exactly(tmp_path, tokenizer):
    texts = {"a.jsonl": notes(40, 0), "b.jsonl": notes(25, 1)}
    for name, t in texts.items():
        write_jsonl(tmp_path / name, t)
    assert main(["prepare", str(tmp_path / "*.jsonl"), "--tokenizer", tokenizer, "--out", str(tmp_path / "out"),
                 "--workers", "2"]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    for shard in manifest["shards"]:
        expected = [sp.encode(t) for t in texts[shard["source"].split("/")[-1]]]
        stored = ArrayRecordDataSource([str(tmp_path / "out" / shard["file"])])
        assert [np.frombuffer(stored[i], "<i4").tolist() for i in range(len(stored))] == expected
        assert shard["documents"] == len(expected) and shard["tokens"] == sum(map(len, expected))
    assert manifest["documents"] == 65 and manifest["tokenizer"]["vocab_size"] == 32000
    assert (manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eos_id"]) == (sp.bos_id(), sp.eos_id())


def test_a_malformed_line_fails_with_file_and_line_and_writes_nothing(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "notes.jsonl", notes(5, 0))
    path.write_text(path.read_text() + '{"text": "unterminated\n')
    assert main(["prepare", str(path), "--tokenizer", tokenizer, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"mellama prepare: error: {path}:6: invalid JSON")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def config(tmp_path, tokenizer, steps=4):
    return f"""
model: {{preset: tiny, vocab_size: 32000}}
seq_len: 64
global_batch: 8
micro_batches: 1
steps: {steps}
checkpoint_every: 2
optim: {{lr: 1.0e-3}}
run_dir: {tmp_path / "run"}
data:
  kind: cpt
  tokenizer: {tokenizer}
  sources:
    - {{name: biomedical, paths: ["{tmp_path / "prepared"}"], format: prepared, weight: 15}}
    - {{name: clinical, paths: ["{tmp_path / "clinical" / "*.jsonl"}"], weight: 1}}
    - {{name: general, paths: ["{tmp_path / "general.jsonl"}"], weight: 4}}
"""


def test_cpt_training_reads_the_configured_mixture_and_resumes_its_exact_batches(tmp_path, tokenizer, capsys):
    write_jsonl(tmp_path / "pubmed.jsonl", notes(60, 2))
    (tmp_path / "clinical").mkdir()
    write_jsonl(tmp_path / "clinical" / "mimic.jsonl", notes(20, 3))
    write_jsonl(tmp_path / "general.jsonl", notes(30, 4))
    main(["prepare", str(tmp_path / "pubmed.jsonl"), "--tokenizer", tokenizer, "--out", str(tmp_path / "prepared")])
    (tmp_path / "run.yaml").write_text(config(tmp_path, tokenizer))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    state = json.loads((tmp_path / "run" / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text())
    taken = [s["tokens"] for s in state["sources"]]
    assert all(taken) and taken[0] > taken[2] > taken[1]  # 15 : 4 : 1 by tokens
    for step in ("4", "3"):  # lose the last checkpoint; the run redoes steps 3-4 from step 2's data position
        shutil.rmtree(tmp_path / "run" / "checkpoints" / step, ignore_errors=True)
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    again = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in again] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in rows
    ]


def test_a_malformed_corpus_line_stops_training_with_file_and_line(tmp_path, tokenizer, capsys):
    main(["prepare", str(write_jsonl(tmp_path / "p.jsonl", notes(10, 5))), "--tokenizer", tokenizer,
          "--out", str(tmp_path / "prepared")])  # fmt: skip
    (tmp_path / "clinical").mkdir()
    bad = write_jsonl(tmp_path / "clinical" / "notes.jsonl", notes(3, 7))
    bad.write_text(bad.read_text().replace('{"text"', "{text", 1))  # line 1: an unquoted key
    write_jsonl(tmp_path / "general.jsonl", notes(10, 6))
    (tmp_path / "run.yaml").write_text(config(tmp_path, tokenizer))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    assert f"mellama train: error: {bad}:1: invalid JSON" in capsys.readouterr().err


def test_data_setup_errors_are_one_line_and_name_the_culprit(tmp_path, tokenizer):
    import dataclasses

    from mellama_jax.config import DataConfig, ModelConfig, SourceConfig, TrainConfig
    from mellama_jax.data.cpt import cpt_batches
    from mellama_jax.data.sft import sft_batches
    from mellama_jax.errors import UserError

    write_jsonl(tmp_path / "notes.jsonl", notes(3, 0))
    main(["prepare", str(tmp_path / "notes.jsonl"), "--tokenizer", tokenizer, "--out", str(tmp_path / "prepared")])
    raw = SourceConfig(name="notes", paths=(str(tmp_path / "notes.jsonl"),))
    prepared = SourceConfig(name="pubmed", paths=(str(tmp_path / "prepared"),), format="prepared")
    base = TrainConfig(model=ModelConfig.tiny(vocab_size=32000), seq_len=32, global_batch=4, micro_batches=1)

    def fails(message, data, cfg=base, build=cpt_batches, rows=4):
        with pytest.raises(UserError, match=message) as err:
            build(dataclasses.replace(cfg, data=data), 0, rows)
        assert "\n" not in str(err.value)

    fails(r"data.tokenizer: source notes is raw text; name a tokenizer", DataConfig(kind="cpt", sources=(raw,)))
    (tmp_path / "empty").mkdir()
    fails(r"data.tokenizer: .*empty holds no tokenizer.model or tokenizer.json",
          DataConfig(kind="cpt", sources=(raw,), tokenizer=str(tmp_path / "empty")))  # fmt: skip
    small = dataclasses.replace(base, model=ModelConfig.tiny(vocab_size=512))
    fails(r"data.tokenizer: tokenizer has 32000 tokens but the model's vocab_size is 512",
          DataConfig(kind="cpt", sources=(raw,), tokenizer=tokenizer), small)  # fmt: skip
    fails(r"source pubmed: prepared with a 32000-token vocabulary, but the model's vocab_size is 512",
          DataConfig(kind="cpt", sources=(prepared,)), small)  # fmt: skip
    two = dataclasses.replace(prepared, paths=(str(tmp_path / "prepared"), str(tmp_path / "prepared")))
    fails(r"source pubmed: a prepared source is one folder, got 2 paths", DataConfig(kind="cpt", sources=(two,)))
    fails(r"manifest\.json: not a prepared corpus \(\[Errno 2\] No such file",
          DataConfig(kind="cpt", sources=(dataclasses.replace(prepared, paths=(str(tmp_path),)),)))  # fmt: skip
    fails(r"source notes: 3 documents cannot feed 4 data shards",
          DataConfig(kind="cpt", sources=(raw,), tokenizer=tokenizer), rows=1)  # fmt: skip
    bad = write_jsonl(tmp_path / "bad.jsonl", ["x"] * 3)
    bad.write_text("not json\n" * 3)
    skipping = SourceConfig(name="bad", paths=(str(bad),))
    with pytest.raises(UserError, match=r"source bad: every record of this shard is malformed"):
        data = DataConfig(kind="cpt", sources=(skipping,), tokenizer=tokenizer, on_error="skip")
        next(cpt_batches(dataclasses.replace(base, data=data), 0, 4))
    parquet = SourceConfig(name="pq", paths=("x.parquet",), format="parquet")
    fails(r"source pq: SFT records are JSONL, array_record or tfds, not parquet",
          DataConfig(kind="sft", sources=(parquet,), tokenizer=tokenizer), build=sft_batches)  # fmt: skip
    assert (
        main(["prepare", str(tmp_path / "notes.jsonl"), "--tokenizer", tokenizer, "--out", str(tmp_path / "prepared")])
        == 2
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    """A two-shard prepared corpus (40 and 25 notes), made once; tests damage copies of it."""
    folder = tmp_path_factory.mktemp("prepared")
    write_jsonl(folder / "a.jsonl", notes(40, 0))
    write_jsonl(folder / "b.jsonl", notes(25, 1))
    tokenizer = str(shared_data / "llama2_tokenizer.model")
    assert main(["prepare", str(folder / "*.jsonl"), "--tokenizer", tokenizer, "--out", str(folder / "out")]) == 0
    return folder / "out"


def _truncate(shard):
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


DAMAGE = {
    "missing shard": (lambda out: (out / "shard-00001.array_record").unlink(),
                      r"out: shard shard-00001\.array_record is missing \(manifest\.json lists it\)$"),
    "truncated shard": (lambda out: _truncate(out / "shard-00001.array_record"),
                        r"shard-00001\.array_record: damaged, not a complete array_record file \(.+\)$"),
    "swapped shard": (lambda out: shutil.copy(out / "shard-00000.array_record", out / "shard-00001.array_record"),
                      r"shard-00001\.array_record: holds 40 documents, manifest\.json says 25 \(damaged\?\)$"),
    "unlisted shard": (lambda out: shutil.copy(out / "shard-00000.array_record", out / "shard-00002.array_record"),
                       r"out: shard shard-00002\.array_record is not in manifest\.json \(a shard of another"),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_prepared_corpus_is_refused_at_open_in_one_line(tmp_path, prepared, damage):
    from mellama_jax.data.prepare import PreparedDocuments
    from mellama_jax.errors import UserError

    out = shutil.copytree(prepared, tmp_path / "out")
    assert len(PreparedDocuments("pubmed", out)) == 65
    break_it, message = DAMAGE[damage]
    break_it(out)
    with pytest.raises(UserError, match=message) as err:
        PreparedDocuments("pubmed", out)
    assert "\n" not in str(err.value)


def test_a_damaged_record_is_one_line_naming_shard_and_record(tmp_path, prepared):
    from mellama_jax.data.prepare import PreparedDocuments
    from mellama_jax.errors import UserError

    out = shutil.copytree(prepared, tmp_path / "out")
    shard = out / "shard-00000.array_record"
    raw = bytearray(shard.read_bytes())
    raw[100:108] = bytes(b ^ 0xFF for b in raw[100:108])  # inside record 1's chunk; the footer still reads
    shard.write_bytes(raw)
    docs = PreparedDocuments("pubmed", out)
    assert len(docs.ids(1)) > 0
    with pytest.raises(UserError, match=r"shard-00000\.array_record:record 1: damaged \(Corrupted Riegeli"):
        docs.ids(0)


def test_the_skip_hint_names_the_switch_of_the_command_in_use(tmp_path, tokenizer, capsys):
    import dataclasses

    from mellama_jax.config import DataConfig, ModelConfig, SourceConfig, TrainConfig
    from mellama_jax.data.cpt import cpt_batches
    from mellama_jax.errors import UserError

    bad = tmp_path / "notes.jsonl"
    bad.write_text("not json\n" * 8)
    assert main(["prepare", str(bad), "--tokenizer", tokenizer, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.endswith(f"{bad}:1: invalid JSON (Expecting value, column 1) "
                                            "(pass --on-error skip to skip such records)\n")  # fmt: skip
    data = DataConfig(kind="cpt", sources=(SourceConfig(name="notes", paths=(str(bad),)),), tokenizer=tokenizer)
    cfg = TrainConfig(model=ModelConfig.tiny(vocab_size=32000), seq_len=32, global_batch=4, micro_batches=1)
    with pytest.raises(UserError, match=r"notes\.jsonl:\d: invalid JSON .* \(set data\.on_error: skip to skip such"):
        next(cpt_batches(dataclasses.replace(cfg, data=data), 0, 4))


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended; reaping orphans is up to init)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_prepare_takes_its_workers_along_and_the_next_run_removes_its_partial(tmp_path, tokenizer, capsys):
    if not pathlib.Path("/proc/self/stat").is_file():
        pytest.skip("finding a process's children needs /proc (Linux)")
    (tmp_path / "big").mkdir()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in notes(1000, 0))
    for i in range(4):  # about a second of tokenizing each
        (tmp_path / "big" / f"notes-{i}.jsonl").write_text(lines * 30)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(mellama_jax.__file__).parents[1])}
    argv = [sys.executable, "-m", "mellama_jax.cli", "prepare", str(tmp_path / "big"), "--tokenizer", tokenizer,
            "--out", str(tmp_path / "out"), "--workers", "2"]  # fmt: skip
    run, workers = subprocess.Popen(argv, stderr=subprocess.DEVNULL, env=env), []
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.partial-*/shard-*")):  # a worker is at work
            assert run.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
            time.sleep(0.02)
        workers = _children(run.pid)
        run.kill()
        run.wait()
        deadline = time.monotonic() + 10
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) >= 2 and not [w for w in workers if _running(w)]
    finally:
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    [partial] = tmp_path.glob(".out.partial-*")
    assert partial.name.startswith(f".out.partial-{run.pid}@")
    small = write_jsonl(tmp_path / "small.jsonl", notes(5, 0))
    assert main(["prepare", str(small), "--tokenizer", tokenizer, "--out", str(tmp_path / "out")]) == 0
    warning = f"mellama prepare: WARNING: removed {partial}, left by an interrupted run (process {run.pid} has ended)"
    assert warning in capsys.readouterr().err.splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "out", "small.jsonl"]


def _big_corpus(folder: pathlib.Path, files: int, copies: int) -> list[pathlib.Path]:
    """`files` JSONL files of `copies` x 1000 notes (30 copies: about a second of tokenizing each)."""
    folder.mkdir()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in notes(1000, 0))
    for i in range(files):
        (folder / f"notes-{i}.jsonl").write_text(lines * copies)
    return sorted(folder.iterdir())


def test_a_bad_file_stops_prepare_at_once_without_waiting_for_the_other_workers(tmp_path, tokenizer, capsys):
    big = _big_corpus(tmp_path / "big", files=3, copies=25)
    bad = write_jsonl(tmp_path / "bad.jsonl", notes(5, 0))
    bad.write_text(bad.read_text() + '{"text": "unterminated\n')  # line 6; first in the job list, so it fails first
    start = time.monotonic()
    assert main(["prepare", str(tmp_path / "big"), "--tokenizer", tokenizer, "--out", str(tmp_path / "good"),
                 "--workers", "2"]) == 0  # fmt: skip
    whole = time.monotonic() - start
    capsys.readouterr()
    start = time.monotonic()
    assert main(["prepare", str(bad), *map(str, big), "--tokenizer", tokenizer, "--out", str(tmp_path / "out"),
                 "--workers", "2"]) == 2  # fmt: skip
    failing = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"mellama prepare: error: {bad}:6: invalid JSON")
    assert failing < whole / 2, f"the failing run took {failing:.1f}s, tokenizing the big files {whole:.1f}s"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def _is_worker(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return b"spawn_main" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()  # not the resource tracker
    return False


def _open_shard(pid: int) -> str | None:
    """The name of the shard process `pid` has open for writing, if any."""
    with contextlib.suppress(OSError):  # it has ended
        for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if ".partial-" in target and target.endswith(".array_record"):
                    return pathlib.Path(target).name
    return None


def test_a_worker_killed_mid_run_is_one_line_naming_its_file_and_leaves_nothing(tmp_path, tokenizer):
    if not pathlib.Path("/proc/self/stat").is_file():
        pytest.skip("finding a process's workers needs /proc (Linux)")
    files = _big_corpus(tmp_path / "big", files=4, copies=30)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(mellama_jax.__file__).parents[1])}
    argv = [sys.executable, "-m", "mellama_jax.cli", "prepare", str(tmp_path / "big"), "--tokenizer", tokenizer,
            "--out", str(tmp_path / "out"), "--workers", "2"]  # fmt: skip
    run, shard, workers = subprocess.Popen(argv, stderr=subprocess.PIPE, env=env, text=True), None, []
    try:
        deadline = time.monotonic() + 120
        while shard is None:  # stop a worker, see which shard it writes, and kill it there (OOM-killer style)
            assert run.poll() is None and time.monotonic() < deadline, "prepare ended before a worker was killed"
            workers = [pid for pid in _children(run.pid) if _is_worker(pid)]
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):  # it has ended
                    os.kill(pid, signal.SIGSTOP)
                    shard = _open_shard(pid)
                    os.kill(pid, signal.SIGKILL if shard else signal.SIGCONT)
                if shard:
                    break
            time.sleep(0.02)
        err = run.communicate(timeout=60)[1]
    finally:
        if run.poll() is None:  # its workers go with it
            run.kill()
            run.wait()
    source = files[int(shard.removeprefix("shard-").removesuffix(".array_record"))]
    assert run.returncode == 2, err
    assert err.strip().splitlines() == [
        f"mellama prepare: error: {source}: the worker tokenizing this file died (killed by SIGKILL, out of memory?)"
    ]
    assert not [w for w in workers if _running(w)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


def test_without_prctl_a_worker_watches_for_its_parent_to_end():
    worker = (
        "import os, time\nfrom mellama_jax.data.prepare import die_with\n"
        "die_with(os.getppid(), linux=False)\nprint('armed', flush=True)\ntime.sleep(60)\n"
    )
    parent = (
        "import subprocess, sys\n"
        f"worker = subprocess.Popen([sys.executable, '-c', {worker!r}], stdout=-1, stderr=-3, text=True)\n"
        "assert worker.stdout.readline() == 'armed\\n'\nprint(worker.pid)\n"
    )  # then ends, orphaning it
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(mellama_jax.__file__).parents[1])}
    worker = int(subprocess.run([sys.executable, "-c", parent], capture_output=True, env=env, check=True).stdout)
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the orphaned worker did not end")
