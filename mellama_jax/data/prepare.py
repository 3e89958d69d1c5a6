"""`mellama prepare`: corpora tokenized once into array_record shards, with a manifest of exact counts.

Each input file becomes one shard (`shard-00000.array_record`, ...) of records holding one document's
token ids as little-endian int32, without BOS/EOS (the packer adds them). Files are tokenized in
parallel worker processes, which end with the process that started them, even a killed one. The first
failure ends them all at once: a worker's error (a malformed line, a full disk) is raised as it comes,
and a worker that dies (out of memory) is one line naming the file it was tokenizing.
`manifest.json` records the tokenizer (vocabulary size, BOS/EOS, file hash) and the document and token
counts of every input file and shard, so mixture weights and epoch sizes are exact before training reads
a byte. The output appears only when complete (outdir.staged_output). Opening a prepared folder checks it
against its manifest: every listed shard there, readable, holding the listed number of documents, and no
shard the manifest does not list.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence

import numpy as np
import tqdm

from mellama_jax.data.sources import expand, open_documents
from mellama_jax.data.tokenizer import Tokenizer, load_tokenizer
from mellama_jax.errors import UserError
from mellama_jax.outdir import staged_output

MANIFEST = "manifest.json"
KIND = "mellama-prepared-v1"

SKIP_HINT = "pass --on-error skip"  # the flag of `mellama prepare`, not the training config's data.on_error
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_worker_tokenizer: Tokenizer | None = None


def die_with(parent: int, linux: bool = sys.platform == "linux") -> None:
    """Ends this worker when `parent` ends, even by kill -9: an orphan would tokenize on, into a folder
    nobody will use."""
    armed = False
    if linux:
        # the signal comes when the thread that started us ends: prepare's, which outlives its workers
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent:  # it ended before we were armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch, args=(parent,), daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is adopted by another process
        time.sleep(0.5)
    os._exit(1)


class _InWorker(Exception):
    """A worker's traceback, as the cause of the error it raised (shown with MELLAMA_DEBUG=1)."""


def _work(conn: multiprocessing.connection.Connection, tokenizer_path: str, parent: int) -> None:
    """A worker: tokenizes the files `conn` sends, until None, answering each with its counts or error."""
    global _worker_tokenizer
    die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends its workers
    with contextlib.suppress(EOFError, ConnectionError):  # the parent has ended
        while (job := conn.recv()) is not None:
            try:
                if _worker_tokenizer is None:
                    _worker_tokenizer = load_tokenizer(tokenizer_path)
                conn.send((True, _tokenize_file(*job), ""))
            except BaseException as e:
                where = "".join(traceback.format_exception(type(e), e, e.__traceback__))
                try:
                    error = pickle.loads(pickle.dumps(e))  # what crosses the pipe must unpickle there too
                except Exception:
                    error = RuntimeError(f"{type(e).__name__}: {e}")
                conn.send((False, error, where))


def _tokenize_file(path: str, fmt: str, field: str, on_error: str, shard: str) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    documents = open_documents(path, [path], fmt, field, on_error)
    documents.skip_hint = SKIP_HINT
    writer = ArrayRecordWriter(shard, "group_size:1")  # one record per chunk: cheap random access
    count = tokens = 0
    for i in range(len(documents)):
        text = documents.get(i)
        if text is None:
            continue
        ids = np.asarray(_worker_tokenizer.encode(text, add_special=False), np.int32)
        writer.write(ids.astype("<i4").tobytes())
        count, tokens = count + 1, tokens + len(ids)
    writer.close()
    return {"documents": count, "tokens": tokens, "skipped": documents.skipped}


def prepare(
    patterns: Sequence[str],
    tokenizer_path: str,
    out_dir: pathlib.Path,
    fmt: str = "",
    field: str = "text",
    on_error: str = "raise",
    workers: int = 0,
    overwrite: bool = False,
) -> dict:
    """Tokenizes every file `patterns` name into `out_dir`; returns the manifest."""
    tokenizer = load_tokenizer(tokenizer_path)
    files = expand(patterns)
    workers = workers or min(len(files), multiprocessing.cpu_count())
    with staged_output(out_dir, overwrite, inputs=files) as staging:
        shards = [staging / f"shard-{i:05d}.array_record" for i in range(len(files))]
        jobs = [(str(f), fmt, field, on_error, str(s)) for f, s in zip(files, shards, strict=True)]
        counts = _tokenize_all(jobs, str(tokenizer_path), workers)
        manifest = {
            "kind": KIND,
            "tokenizer": {
                "file": tokenizer.files[0].name,
                "sha256": hashlib.sha256(tokenizer.files[0].read_bytes()).hexdigest(),
                "vocab_size": tokenizer.vocab_size,
                "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id,
            },
            "documents": sum(c["documents"] for c in counts),
            "tokens": sum(c["tokens"] for c in counts),  # without BOS/EOS
            "skipped": sum(c["skipped"] for c in counts),
            "shards": [{"file": s.name, "source": str(f), **c} for f, s, c in zip(files, shards, counts, strict=True)],
        }
        if manifest["documents"] == 0:
            raise UserError(f"{', '.join(patterns)}: no documents to prepare")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _tokenize_all(jobs: list[tuple], tokenizer_path: str, workers: int) -> list[dict]:
    """`_tokenize_file(*job)` of every job, in `workers` processes. The first failure ends every worker at
    once, before the staging folder they write into is removed: a worker's error is raised, a worker's
    death is a UserError naming the file it was tokenizing. (concurrent.futures cannot end running jobs
    before Python 3.14, nor say which job a dead worker held; multiprocessing.Pool waits forever for it.)"""
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that may hold jax threads
    counts: list[dict] = [{} for _ in jobs]
    todo, procs, busy = iter(range(len(jobs))), {}, {}  # busy: connection -> index of the job its worker holds

    def give(conn: multiprocessing.connection.Connection) -> None:
        i = next(todo, None)
        with contextlib.suppress(OSError):  # a dead worker: its end-of-file says so
            conn.send(None if i is None else jobs[i])
        if i is not None:
            busy[conn] = i

    try:
        for _ in range(min(workers, len(jobs))):
            conn, theirs = spawn.Pipe()
            procs[conn] = spawn.Process(target=_work, args=(theirs, tokenizer_path, os.getpid()), daemon=True)
            procs[conn].start()  # from this thread, which outlives the workers (see die_with)
            theirs.close()
        with tqdm.tqdm(total=len(jobs), unit="file", desc="prepare", disable=None) as bar:
            for conn in procs:
                give(conn)
            while busy:
                for conn in multiprocessing.connection.wait(list(busy)):
                    i = busy.pop(conn)
                    try:
                        ok, result, where = conn.recv()
                    except (EOFError, OSError):
                        raise _died(procs[conn], jobs[i][0]) from None
                    if not ok:
                        raise result from _InWorker(where)
                    counts[i] = result
                    bar.update()
                    give(conn)
    except BaseException:
        for proc in procs.values():
            proc.terminate()
        raise
    finally:
        for proc in procs.values():
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return counts


def _died(proc: multiprocessing.process.BaseProcess, path: str) -> UserError:
    proc.join(10)  # its pipe closes as it ends; the exit status follows
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
        how += ", out of memory?" if -code == signal.SIGKILL else ""
    else:
        how = f"exit status {code}" if code is not None else "it closed its pipe"
    return UserError(f"{path}: the worker tokenizing this file died ({how})")


class PreparedDocuments:
    """A prepared folder's documents: `ids(i)` is document i's token ids (no BOS/EOS)."""

    def __init__(self, name: str, folder: pathlib.Path):
        self.name, self.skipped, self.folder = name, 0, pathlib.Path(folder)
        path = self.folder / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a prepared corpus ({str(e).splitlines()[0]})") from None
        try:
            if self.manifest.get("kind") != KIND:
                raise KeyError("kind")
            listed = {s["file"]: int(s["documents"]) for s in self.manifest["shards"]}
            total = int(self.manifest["documents"])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise UserError(f"{path}: not a manifest written by mellama prepare") from None
        unlisted = sorted({f.name for f in self.folder.glob("shard-*.array_record")} - set(listed))
        if unlisted:
            raise UserError(f"{self.folder}: shard {unlisted[0]} is not in {MANIFEST} (a shard of another corpus?)")
        readers = {file: _open_shard(self.folder / file, documents) for file, documents in listed.items()}
        self.files = [file for file, reader in readers.items() if len(reader)]
        self.readers = [readers[file] for file in self.files]
        self.starts = np.concatenate([[0], np.cumsum([len(r) for r in self.readers], dtype=np.int64)])
        if self.starts[-1] != total:
            raise UserError(f"{path}: the shards hold {self.starts[-1]} documents, the manifest says {total}")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def ids(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        local = i - int(self.starts[shard])
        try:
            raw = self.readers[shard][local]
        except Exception as e:  # damage the checks at open cannot see: a record's own bytes
            where = f"{self.folder / self.files[shard]}:record {local + 1}"
            raise UserError(f"{where}: damaged ({_first_line(e)})") from None
        return np.frombuffer(raw, "<i4").astype(np.int32)


def _open_shard(shard: pathlib.Path, documents: int):
    """A listed shard's reader, checked cheaply: the file is there, its footer reads, its count is the manifest's."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    if not shard.is_file():
        raise UserError(f"{shard.parent}: shard {shard.name} is missing ({MANIFEST} lists it)")
    try:
        reader = ArrayRecordDataSource([str(shard)])
    except Exception as e:  # the C++ reader raises RuntimeError / ValueError variants, some without text
        raise UserError(f"{shard}: damaged, not a complete array_record file ({_first_line(e)})") from None
    if len(reader) != documents:
        raise UserError(f"{shard}: holds {len(reader)} documents, {MANIFEST} says {documents} (damaged?)")
    return reader


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__
