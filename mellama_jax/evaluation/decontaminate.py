"""`mellama decontaminate`: eval examples whose text shares a long n-gram with the training corpus.

GPT-3's method (Brown et al. 2020, appendix C): an example is contaminated if any 13-gram of its
question/context (`Example.text`) occurs in a training document. Grams are of normalised words (see
`normalise`), not tokens: raw corpora and prepared shards (ids decoded by the corpus' tokenizer) agree. A
text shorter than n words is one gram of its whole length, as in GPT-3, down to MIN_WORDS (GPT-3's least
N); a shorter one ("Is it benign?") occurs everywhere: counted as too short to check, never as contaminated.

The eval side is indexed as sorted 64-bit gram hashes, each with its example; the corpus is streamed
document by document (by worker processes, stretch by stretch), each document's gram hashes looked up
with numpy: memory is the index plus one document per process, whatever the corpus size. Hashes: simple
tabulation hashing of each word's bytes, then a sum of word hashes times odd per-position constants
(mod 2^64); a corpus gram falsely hits a 10^6-gram index with probability 10^6 / 2^64 = 5e-14 (0.005
false hits in 10^11 words). The report says where the grams are (source, document, file:line or
shard:record), never the text: clinical corpora are sensitive.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import re
import signal
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import tqdm

from mellama_jax.errors import UserError
from mellama_jax.outdir import replace_file, sha256_of

log = logging.getLogger(__name__)

KIND = "mellama-contamination-v1"
N = 13
MIN_WORDS = 8
CHUNK = 2000  # documents per stretch a worker scans: a progress step
PLACES = 20  # corpus places kept per contaminated example; `documents` counts them all
NORMALISATION = "NFKC, lower-cased; runs of characters other than letters and digits separate words"
_SEPARATORS = re.compile(r"[\W_]+")
_SEED = 0x6D656C6C616D61  # fixed: hashes must agree across runs and processes
_TABLE = np.random.default_rng(_SEED).integers(0, 2**64, size=(64, 256), dtype=np.uint64)  # [byte offset, byte]


def normalise(text: str) -> str:
    """`text`'s words, joined by single spaces: NFKC (so "ﬁ", "²" and composed or decomposed accents read
    alike), lower-cased, every run of characters other than letters and digits a separator."""
    return _SEPARATORS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def word_hashes(text: str) -> np.ndarray:
    """A 64-bit hash per normalised word of `text`: [W] uint64."""
    data = np.frombuffer(normalise(text).encode("utf-8", "surrogatepass"), np.uint8)
    if not data.size:
        return np.zeros(0, np.uint64)
    space = data == ord(" ")  # exactly one between words
    starts = np.concatenate([[0], np.flatnonzero(space) + 1])
    word = np.cumsum(space)  # each byte's word (a space counts to the next one; dropped below)
    offset = (np.arange(data.size) - starts[word])[~space] % len(_TABLE)
    entries = _TABLE[offset, data[~space]]
    return np.bitwise_xor.reduceat(entries, starts - np.arange(starts.size))  # each word's bytes, spaces removed


@functools.cache
def _multipliers(n: int) -> np.ndarray:
    return np.random.default_rng(_SEED + 1).integers(0, 2**64, size=n, dtype=np.uint64) | np.uint64(1)


def gram_hashes(hashes: np.ndarray, lengths: Sequence[int]) -> dict[int, np.ndarray]:
    """For each length L, the hashes of every run of L consecutive words: [W - L + 1] uint64 (empty if W < L)."""
    mult, total = _multipliers(max(lengths)), hashes.size
    out, acc = {}, np.zeros(total, np.uint64)
    for k in range(max(lengths)):
        # acc[i] = sum over j <= k of hashes[i + j] * mult[j], for the i where i + k is still a word
        acc = acc[: max(total - k, 0)] + hashes[k:] * mult[k]
        if k + 1 in lengths:
            out[k + 1] = acc.copy()
    return out


@dataclasses.dataclass
class Index:
    """The eval side: `hashes` sorted, `owners[i]` the example (number in `examples`) hashes[i] came from."""

    examples: list[tuple[str, str]]  # (task, example id)
    grams: np.ndarray  # [examples] distinct grams per example (0: too short)
    hashes: np.ndarray  # [P] uint64
    owners: np.ndarray  # [P] int64
    lengths: tuple[int, ...]  # gram lengths in the index: n, and those of shorter texts


def build_index(tasks: dict[str, Sequence], n: int = N) -> Index:
    """The n-gram index of `tasks` (task name -> examples with `.id` and `.text`)."""
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    examples, grams, hashes, owners, lengths = [], [], [], [], {n}
    for task, rows in tasks.items():
        for example in rows:
            own = word_hashes(example.text)
            length = min(n, own.size)  # a text shorter than n words is one gram of its length
            own = np.unique(gram_hashes(own, [length])[length]) if length >= min(n, MIN_WORDS) else own[:0]
            lengths.add(length if own.size else n)
            hashes.append(own)
            owners.append(np.full(own.size, len(examples), np.int64))
            examples.append((task, str(example.id)))
            grams.append(own.size)  # 0: too short to check
    hashes, owners = np.concatenate([own[:0], *hashes]), np.concatenate([np.zeros(0, np.int64), *owners])
    order = np.argsort(hashes, kind="stable")
    return Index(examples, np.asarray(grams, np.int64), hashes[order], owners[order], tuple(sorted(lengths)))


# A source's documents: text(i) (None: a skipped malformed record) and where(i), the place an error would name.
Reader = collections.namedtuple("Reader", ["count", "text", "where"])


class Corpus:
    """One training source. It pickles as its recipe: a worker process reopens it."""

    def __init__(self, name: str, description: dict, opener: functools.partial):
        self.name, self.opener, self.reader = name, opener, opener()
        self.description = {**description, "documents": self.reader.count}

    def __reduce__(self):
        return Corpus, (self.name, self.description, self.opener)


class Scan:
    """The matches found so far; its size depends on the index only (PLACES per example at most)."""

    def __init__(self, index: Index):
        self.index = index
        self.seen = np.zeros(index.hashes.size, bool)  # index entries found somewhere in the corpus
        self.documents = np.zeros(len(index.examples), np.int64)  # corpus documents holding each example's grams
        self.places: dict[int, list[dict]] = {}
        self.scanned = self.words = 0
        self.skipped = collections.Counter()  # per source: malformed records skipped (data.on_error: skip)

    def run(self, corpus: Corpus, start: int, stop: int) -> None:
        """Looks up documents start .. stop - 1 of `corpus`."""
        for i in range(start, stop):
            if (text := corpus.reader.text(i)) is not None:
                self.add(corpus, i, text)
            else:
                self.skipped[corpus.name] += 1

    def add(self, corpus: Corpus, i: int, text: str) -> None:
        """Looks up document i of `corpus`, whose text is `text`."""
        index, hashes = self.index, word_hashes(text)
        self.scanned, self.words = self.scanned + 1, self.words + hashes.size
        if not index.hashes.size or hashes.size < index.lengths[0]:
            return
        grams = np.unique(np.concatenate(list(gram_hashes(hashes, index.lengths).values())))
        lo = np.searchsorted(index.hashes, grams)
        hit = index.hashes[np.minimum(lo, index.hashes.size - 1)] == grams
        if not hit.any():
            return
        lo, size = lo[hit], np.searchsorted(index.hashes, grams[hit], side="right") - lo[hit]
        entries = np.repeat(lo - np.cumsum(size) + size, size) + np.arange(size.sum())  # every index entry hit
        self.seen[entries] = True
        owners, counts = np.unique(index.owners[entries], return_counts=True)
        self.documents[owners] += 1
        for owner, count in zip(owners.tolist(), counts.tolist(), strict=True):
            places = self.places.setdefault(owner, [])
            if len(places) < PLACES:
                places.append({"source": corpus.name, "document": i, "where": corpus.reader.where(i), "ngrams": count})

    def merge(self, part: Scan) -> None:
        """Adds the matches of a later stretch of the corpus (a worker's)."""
        self.seen[part.seen] = True  # a worker sends the indices of its seen entries, not a mask
        self.documents += part.documents
        for owner, places in part.places.items():
            mine = self.places.setdefault(owner, [])
            mine.extend(places[: PLACES - len(mine)])
        self.scanned, self.words = self.scanned + part.scanned, self.words + part.words
        self.skipped.update(part.skipped)

    def tasks(self) -> dict[str, dict]:
        """Per task: examples checked, too short, contaminated (count, fraction, and each one's matches)."""
        index = self.index
        found = np.bincount(index.owners[self.seen], minlength=len(index.examples))
        out: dict[str, dict] = {}
        for e, (task, example_id) in enumerate(index.examples):
            entry = out.setdefault(task, {"checked": 0, "too_short": 0, "contaminated": 0, "examples": []})
            entry["checked"] += 1
            entry["too_short"] += int(index.grams[e] == 0)
            if found[e]:
                entry["examples"].append({"id": example_id, "ngrams": int(found[e]), "of": int(index.grams[e]),
                                          "documents": int(self.documents[e]), "places": self.places[e]})  # fmt: skip
        for entry in out.values():
            entry["contaminated"] = len(entry["examples"])
            entry["fraction"] = entry["contaminated"] / entry["checked"]
        return out


_worker: tuple[Index, Sequence[Corpus]] | None = None


def _start_worker(parent: int, index: Index, corpora: Sequence[Corpus]) -> None:
    from mellama_jax.data.prepare import die_with

    global _worker
    die_with(parent)  # an orphan would scan on for nobody
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends its workers
    _worker = (index, corpora)


def _scan_stretch(c: int, start: int, stop: int) -> Scan:
    index, corpora = _worker
    part = Scan(index)
    part.run(corpora[c], start, stop)
    part.index, part.seen = None, np.flatnonzero(part.seen)  # what crosses the pipe: the parent has the index
    return part


def scan(index: Index, corpora: Sequence[Corpus], workers: int = 1) -> Scan:
    """Streams every document of `corpora` through the index, in stretches of CHUNK documents shared by
    `workers` processes (each with its own copy of the index), with a progress bar over documents."""
    result = Scan(index)
    jobs = [(c, start, min(start + CHUNK, corpus.reader.count))
            for c, corpus in enumerate(corpora) for start in range(0, corpus.reader.count, CHUNK)]  # fmt: skip
    workers = min(workers, len(jobs))
    with tqdm.tqdm(total=sum(c.reader.count for c in corpora), unit="doc", desc="decontaminate", disable=None) as bar:
        if workers <= 1:
            for c, start, stop in jobs:
                result.run(corpora[c], start, stop)
                bar.update(stop - start)
            return result
        spawn = multiprocessing.get_context("spawn")  # no fork of a process that may hold other threads
        with ProcessPoolExecutor(workers, spawn, _start_worker, (os.getpid(), index, corpora)) as pool:
            running = collections.deque()
            try:
                for k, job in enumerate(jobs):
                    running.append((job, pool.submit(_scan_stretch, *job)))
                    # two stretches per worker in flight, merged in corpus order: the places stay in order
                    while len(running) > 2 * workers or (running and k == len(jobs) - 1):
                        (_, start, stop), future = running.popleft()
                        result.merge(future.result())
                        bar.update(stop - start)
            except BrokenProcessPool:
                raise UserError("a decontaminate worker process died (out of memory? try --workers 1)") from None
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return result


def _record_text(record: str | dict | list | None) -> str | None:
    """A document's text; an SFT record (several fields, turns) is its strings, one per line."""
    if record is None or isinstance(record, str):
        return record
    values = record.values() if isinstance(record, dict) else record
    return "\n".join(t for v in values if isinstance(v, dict | list | str) and (t := _record_text(v)))


def _read_raw(name: str, paths: Sequence[str], fmt: str, field: str, on_error: str, split: str, data_dir: str):
    from mellama_jax.data.sources import open_documents

    docs = open_documents(name, paths, fmt, field, on_error, split, data_dir)
    return Reader(len(docs), lambda i: _record_text(docs.get(i)), docs.where)


def _raw(name: str, paths: Sequence[str], fmt: str, field: str, on_error: str, split="train", data_dir="") -> Corpus:
    description = {"name": name, "format": fmt or "by extension", "paths": list(paths)}
    return Corpus(name, description, functools.partial(_read_raw, name, paths, fmt, field, on_error, split, data_dir))


def _read_prepared(name: str, folder: pathlib.Path, tokenizer_path: str) -> Reader:
    from mellama_jax.data.prepare import PreparedDocuments
    from mellama_jax.data.tokenizer import load_tokenizer

    docs = PreparedDocuments(name, folder)
    meta = docs.manifest.get("tokenizer", {})
    if not tokenizer_path:
        raise UserError(f"{folder}: its token ids are read as text with the tokenizer that prepared them "
                        f"({meta.get('file')}, sha256 {meta.get('sha256')}); pass --tokenizer")  # fmt: skip
    tokenizer = load_tokenizer(tokenizer_path)
    if hashlib.sha256(tokenizer.files[0].read_bytes()).hexdigest() != meta.get("sha256"):
        raise UserError(f"{tokenizer.files[0]}: not the tokenizer {folder} was prepared with (sha256 differs)")

    def where(i: int) -> str:
        shard = int(np.searchsorted(docs.starts, i, side="right")) - 1
        return f"{folder / docs.files[shard]}:record {i - int(docs.starts[shard]) + 1}"

    return Reader(len(docs), lambda i: tokenizer.decode(docs.ids(i)), where)


def _prepared(name: str, folder: pathlib.Path, tokenizer_path: str) -> Corpus:
    description = {"name": name, "format": "prepared", "paths": [str(folder)]}
    return Corpus(name, description, functools.partial(_read_prepared, name, folder, tokenizer_path))


def open_corpora(data: Sequence[str], tokenizer: str = "", text_field: str = "text") -> list[Corpus]:
    """The training corpus `data` names: one training YAML (its data.sources), or prepared folders and raw
    files/folders/globs, each one source named as given. `tokenizer` reads prepared token ids as text."""
    if len(data) == 1 and data[0].endswith((".yaml", ".yml")):
        from mellama_jax.config_file import load_config

        cfg = load_config(data[0])
        if cfg.data.kind == "synthetic":
            raise UserError(f"{data[0]}: data.kind is synthetic: no corpus to check")
        tokenizer = tokenizer or cfg.data.tokenizer or cfg.init_from
        corpora = []
        for s in cfg.data.sources:
            if s.format == "prepared":
                if len(s.paths) != 1:
                    raise UserError(f"{data[0]}: source {s.name}: a prepared source is one folder")
                corpora.append(_prepared(s.name, pathlib.Path(s.paths[0]), tokenizer))
            else:
                field = "" if cfg.data.kind == "sft" else s.text_field  # SFT records: every field counts
                corpora.append(_raw(s.name, s.paths, s.format, field, cfg.data.on_error, s.split, s.data_dir))
        return corpora
    from mellama_jax.data.prepare import MANIFEST

    return [_prepared(p, pathlib.Path(p), tokenizer) if (pathlib.Path(p) / MANIFEST).is_file()
            else _raw(p, [p], "", text_field, "raise") for p in data]  # fmt: skip


def _check_inputs(out: pathlib.Path, corpus: Sequence[str], task_files: Sequence[pathlib.Path]) -> None:
    """The report must not replace the corpus or the eval data it is about (--overwrite or not)."""
    for given in [*corpus, *task_files]:
        for path in [pathlib.Path(p) for p in glob.glob(str(given))] or [pathlib.Path(given)]:
            if path.resolve() == out.resolve():
                raise UserError(f"--out {out}: would replace the input {path}")


def decontaminate(data: Sequence[str], tasks: str, data_dir: pathlib.Path, out: pathlib.Path, n: int = N,
                  limit: int | None = None, overwrite: bool = False, tokenizer: str = "", text_field: str = "text",
                  workers: int = 0) -> dict:  # fmt: skip
    """Checks the eval `tasks` (as `mellama eval --tasks`) against the corpus `data` with `workers` processes
    (0: one per core); writes the report to `out` and returns it."""
    out = pathlib.Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    from mellama_jax.evaluation.tasks import TASKS, load_examples

    examples = load_examples(tasks, pathlib.Path(data_dir), limit)
    index = build_index(examples, n)  # the eval side first: it is quick
    files = {name: TASKS[name].find(pathlib.Path(data_dir)) for name in examples}
    corpora = open_corpora(data, tokenizer, text_field)
    _check_inputs(out, [*data, *(p for c in corpora for p in c.description["paths"])], list(files.values()))
    result = scan(index, corpora, workers or multiprocessing.cpu_count())
    settings = {"n": n, "min_words": min(n, MIN_WORDS), "normalisation": NORMALISATION, "hash": "64-bit",
                "data": list(data), "data_dir": str(data_dir), "limit": limit,
                "corpus": [{**c.description, "skipped": result.skipped[c.name]} for c in corpora],
                "documents": result.scanned, "words": result.words}  # fmt: skip
    report = {"kind": KIND, "settings": settings, "tasks": result.tasks()}
    for name, entry in report["tasks"].items():  # what `mellama eval` checks: the ids are those of this file
        entry.update(data_file=str(files[name]), data_sha256=sha256_of(files[name]))
    if out.exists() and not overwrite:  # written by someone else while we scanned
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(out, (json.dumps(report, indent=2) + "\n").encode())
    return report


def summary(report: dict) -> list[str]:
    """Readable lines: what was scanned, and per task how many examples are contaminated (ids only)."""
    s = report["settings"]
    lines = [f"scanned {s['documents']} documents, {s['words']} words of {', '.join(c['name'] for c in s['corpus'])} "
             f"for {s['n']}-gram overlaps"]  # fmt: skip
    for name, task in report["tasks"].items():
        short = f", {task['too_short']} too short to check" if task["too_short"] else ""
        lines.append(f"  {name}: {task['contaminated']} of {task['checked']} examples contaminated "
                     f"({task['fraction']:.1%}){short}")  # fmt: skip
        if ids := [e["id"] for e in task["examples"]]:
            lines.append(f"    ids: {', '.join(ids[:10])}{f' and {len(ids) - 10} more' if len(ids) > 10 else ''}")
    return lines


def contaminated_ids(report_path: str | pathlib.Path) -> dict[str, set[str]]:
    """Task name -> ids of its contaminated examples, from a report `mellama decontaminate` wrote."""
    path = pathlib.Path(report_path)
    try:
        report = json.loads(path.read_text())
        if report["kind"] != KIND:
            raise KeyError("kind")
        ids = {name: {e["id"] for e in task["examples"]} for name, task in report["tasks"].items()}
        if not all(isinstance(i, str) for task in ids.values() for i in task):
            raise TypeError("id")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: not a contamination report written by mellama decontaminate") from None
    return ids
