"""`mellama prepare`: corpora tokenized once into array_record shards, with a manifest of exact counts.

Each input file becomes one shard (`shard-00000.array_record`, ...) of records holding one document's
token ids as little-endian int32, without BOS/EOS (the packer adds them). Files are tokenized in
parallel worker processes. `manifest.json` records the tokenizer (vocabulary size, BOS/EOS, file hash)
and the document and token counts of every input file and shard, so mixture weights and epoch sizes
are exact before training reads a byte. The output appears only when complete (outdir.staged_output).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import pathlib
from collections.abc import Sequence

import numpy as np
import tqdm

from mellama_jax.data.sources import expand, open_documents
from mellama_jax.data.tokenizer import Tokenizer, load_tokenizer
from mellama_jax.errors import UserError
from mellama_jax.outdir import staged_output

MANIFEST = "manifest.json"
KIND = "mellama-prepared-v1"

_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _tokenize_file(path: str, fmt: str, field: str, on_error: str, shard: str) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    documents = open_documents(path, [path], fmt, field, on_error)
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
        spawn = multiprocessing.get_context("spawn")  # no fork of a process that may hold jax threads
        with concurrent.futures.ProcessPoolExecutor(workers, spawn, _start_worker, (str(tokenizer_path),)) as pool:
            jobs = [
                pool.submit(_tokenize_file, str(f), fmt, field, on_error, str(s))
                for f, s in zip(files, shards, strict=True)
            ]
            for _ in tqdm.tqdm(concurrent.futures.as_completed(jobs), total=len(jobs), unit="file", desc="prepare"):
                pass
            counts = [job.result() for job in jobs]  # re-raises a worker's UserError here
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


class PreparedDocuments:
    """A prepared folder's documents: `ids(i)` is document i's token ids (no BOS/EOS)."""

    def __init__(self, name: str, folder: pathlib.Path):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        path = pathlib.Path(folder) / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a prepared corpus ({str(e).splitlines()[0]})") from None
        if self.manifest.get("kind") != KIND:
            raise UserError(f"{path}: not a manifest written by mellama prepare")
        self.name, self.skipped = name, 0
        shards = [s for s in self.manifest["shards"] if s["documents"]]
        self.reader = ArrayRecordDataSource([str(pathlib.Path(folder) / s["file"]) for s in shards])
        if len(self.reader) != self.manifest["documents"]:
            raise UserError(f"{path}: the shards hold {len(self.reader)} documents, the manifest says {len(self)}")

    def __len__(self) -> int:
        return int(self.manifest["documents"])

    def ids(self, i: int) -> np.ndarray:
        return np.frombuffer(self.reader[i], "<i4").astype(np.int32)
