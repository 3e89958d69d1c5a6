"""The CPT mixture: named corpora mixed by token proportions and packed into rows with segment ids.

- Mixing: the next document always comes from the source furthest below its share of the tokens
  taken so far, so the proportions hold to within one document at every point, deterministically.
- Order: each source's documents are visited in a seeded permutation per epoch (grain's lazy index
  shuffle: no index array, whatever the corpus size). Data shard s of S (one per data-parallel process)
  takes every S-th position of it, so the shards are disjoint and together cover the corpus.
- Packing: a document is BOS + tokens + EOS, cut into windows of at most the model's context (positions
  restart at 0 in each window). Windows are laid into rows back to back; one that does not fit the rest
  of a row continues at the start of the next, keeping its positions. `segment_ids` number the pieces
  of a row from 1 (0 = padding, only after the data ends); `loss_mask` is 1 on every real token.
- Held out: with `data.heldout`, the documents `packing.held_out` picks are skipped here and are the
  whole of the evaluation mixture (`evaluation=True`), where every source's documents are taken once, a
  source that runs out leaving the mixture, in an order that does not depend on the run's seed.
- Stopping: with `epochs`, when a source would start epoch `epochs` + 1 (`on_source_end: stop`), or
  (`repeat`) when every source has had `epochs` epochs, those done first starting over meanwhile; and
  when this shard has taken its share of `token_budget`. The last batch is padded.
- State: per source (epoch, next position, tokens taken, skipped) and where the document in hand is cut.
  It is a few numbers of JSON, and restoring it gives identical next batches.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np

from mellama_jax.config import SourceConfig, TrainConfig
from mellama_jax.data.packing import PackedBatches, held_out, held_out_indices, shuffled
from mellama_jax.data.prepare import PreparedDocuments
from mellama_jax.data.sources import open_documents
from mellama_jax.data.tokenizer import TOKENIZER_MODEL_FILES, check_vocab, load_tokenizer
from mellama_jax.errors import UserError


class Stream:
    """One source's documents for one data shard, as BOS + ids + EOS arrays, epoch by epoch; `heldout` is the
    share of them (`packing.held_out`) that training skips."""

    def __init__(self, name: str, count: int, ids: Callable[[int], np.ndarray | None], bos: int, eos: int, seed: int,
                 heldout: float = 0.0):  # fmt: skip
        self.name, self.count, self.ids, self.bos, self.eos, self.seed = name, count, ids, bos, eos, seed
        self.shard, self.shards, self.heldout = 0, 1, heldout

    def split(self, shard: int, shards: int, empty_ok: bool = False) -> Stream:
        """This stream as data shard `shard` of `shards`; only an evaluation's may be empty (its rows are padding)."""
        if self.count < shards and not empty_ok:
            raise UserError(f"source {self.name}: {self.count} documents cannot feed {shards} data shards")
        self.shard, self.shards = shard, shards
        return self

    @property
    def length(self) -> int:  # this shard's documents per epoch
        return len(range(self.shard, self.count, self.shards))

    def index(self, epoch: int, k: int) -> int:
        return int(shuffled(self.count, self.seed, epoch)[k * self.shards + self.shard])

    def held_out(self, epoch: int, k: int) -> bool:
        return self.heldout > 0 and bool(held_out(self.index(epoch, k), self.heldout)[0])

    def tokens(self, epoch: int, k: int) -> np.ndarray | None:
        ids = self.ids(self.index(epoch, k))
        return None if ids is None else np.concatenate([[self.bos], ids, [self.eos]]).astype(np.int32)

    def held_out_part(self) -> Stream:
        """The documents this stream's training skips, as a stream of their own (unsplit)."""
        picked = held_out_indices(self.count, self.heldout)
        return Stream(self.name, len(picked), lambda i: self.ids(int(picked[i])), self.bos, self.eos, self.seed)


class Mixture(PackedBatches):
    """Packed CPT batches from `streams`, mixed by token `weights`; with `once`, every document once, a
    source that has run out leaving the mixture (an evaluation's)."""

    def __init__(self, streams: list[Stream], weights: list[float], seq_len: int, rows: int, window: int,
                 epochs: int = 0, token_budget: int = 0, repeat: bool = False, once: bool = False):  # fmt: skip
        self.streams, self.weights = streams, np.asarray(weights, np.float64) / sum(weights)
        self.seq_len, self.rows, self.window, self.epochs, self.budget = seq_len, rows, window, epochs, token_budget
        self.repeat, self.once = repeat, once
        self.set_state({"sources": [{"epoch": 0, "next": 0, "tokens": 0, "skipped": 0} for _ in streams],
                        "piece": None, "done": False})  # fmt: skip

    def _restore(self) -> None:
        piece = self.state["piece"]  # [source, epoch, k, offset]: the document in hand, read again
        self.tokens = None if piece is None else self.streams[piece[0]].tokens(piece[1], piece[2])

    def _take_document(self) -> bool:
        """Puts the next document in hand; False when the data has ended."""
        sources, misses = self.state["sources"], 0
        while True:
            taken = np.asarray([s["tokens"] for s in sources], np.float64)
            if self.budget and taken.sum() >= self.budget:
                return False
            behind = taken / self.weights
            if self.once:
                behind[[s["next"] == st.length for s, st in zip(sources, self.streams, strict=True)]] = np.inf
                if np.isinf(behind).all():
                    return False
            i = int(np.argmin(behind))
            source, stream = sources[i], self.streams[i]
            if source["next"] == stream.length:
                if self.epochs and source["epoch"] + 1 >= self.epochs and not self.repeat:
                    return False
                source["epoch"], source["next"] = source["epoch"] + 1, 0
                if self.epochs and all(s["epoch"] >= self.epochs for s in sources):  # (repeat: the last one ended)
                    return False
            k = source["next"]
            source["next"] += 1
            held = stream.held_out(source["epoch"], k)  # kept for validation: never trained on
            tokens = None if held else stream.tokens(source["epoch"], k)
            if tokens is None:  # held out, or a malformed record skipped (on_error: skip), which is counted
                source["skipped"], misses = source["skipped"] + (not held), misses + 1
                if misses > stream.length:
                    also = " or held out (data.heldout)" if stream.heldout else ""
                    raise UserError(f"source {stream.name}: every record of this shard is malformed{also}")
                continue
            source["tokens"] += len(tokens)
            self.state["piece"], self.tokens = [i, source["epoch"], k, 0], tokens
            return True

    def _fill_row(self, tokens: np.ndarray, positions: np.ndarray, segments: np.ndarray, mask: np.ndarray) -> None:
        t, segment = 0, 0
        while t < self.seq_len:
            if self.state["piece"] is None and (self.state["done"] or not self._take_document()):
                self.state["done"] = True
                return
            offset = self.state["piece"][3]
            window_end = min(len(self.tokens), (offset // self.window + 1) * self.window)
            n = min(window_end - offset, self.seq_len - t)
            segment += 1
            tokens[t : t + n] = self.tokens[offset : offset + n]
            positions[t : t + n] = offset % self.window + np.arange(n)
            segments[t : t + n], mask[t : t + n] = segment, 1
            t, offset = t + n, offset + n
            self.state["piece"][3] = offset
            if offset == len(self.tokens):
                self.state["piece"], self.tokens = None, None


def _stream(source: SourceConfig, index: int, cfg: TrainConfig, tokenizer, seed: int) -> Stream:
    seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    heldout = cfg.data.heldout
    if source.format == "prepared":
        if len(source.paths) != 1:
            raise UserError(f"source {source.name}: a prepared source is one folder, got {len(source.paths)} paths")
        docs = PreparedDocuments(source.name, pathlib.Path(source.paths[0]))
        meta = docs.manifest["tokenizer"]
        if meta["vocab_size"] != cfg.model.vocab_size:
            raise UserError(f"source {source.name}: prepared with a {meta['vocab_size']}-token vocabulary, "
                            f"but the model's vocab_size is {cfg.model.vocab_size}")  # fmt: skip
        return Stream(source.name, len(docs), docs.ids, meta["bos_id"], meta["eos_id"], seed, heldout)
    docs = open_documents(source.name, source.paths, source.format, source.text_field, cfg.data.on_error,
                          source.split, source.data_dir)  # fmt: skip

    def ids(i: int) -> np.ndarray | None:
        text = docs.get(i)
        return None if text is None else np.asarray(tokenizer.encode(text, add_special=False), np.int32)

    return Stream(source.name, len(docs), ids, tokenizer.bos_id, tokenizer.eos_id, seed, heldout)


def tokenizer_for(cfg: TrainConfig):
    """The tokenizer raw sources are read with (data.tokenizer, else init_from's); None if all are prepared."""
    raw = [s.name for s in cfg.data.sources if s.format != "prepared"]
    path = cfg.data.tokenizer or cfg.init_from
    if not raw:
        return None
    if not path:
        raise UserError(f"data.tokenizer: source {raw[0]} is raw text; name a tokenizer (or an init_from with one)")
    folder = pathlib.Path(path)
    if folder.is_dir() and not any((folder / n).is_file() for n in TOKENIZER_MODEL_FILES):
        raise UserError(f"data.tokenizer: {folder} holds no tokenizer.model or tokenizer.json")
    tokenizer = load_tokenizer(path)
    check_vocab(tokenizer, cfg.model.vocab_size, "data.tokenizer")
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise UserError(f"data.tokenizer: {path} defines no BOS/EOS token, which documents are wrapped in")
    return tokenizer


def cpt_batches(cfg: TrainConfig, first_row: int, rows: int, evaluation: bool = False) -> Mixture:
    """This process's batches: rows first_row .. first_row + rows - 1 of every global batch.

    With `evaluation`, `cfg.data` is read for validation: its held-out share if it has one (else all of it),
    each document once, in the same order whatever the run's seed, so that runs compare.
    """
    tokenizer = tokenizer_for(cfg)
    shard, shards = first_row // rows, cfg.global_batch // rows
    seed = 0 if evaluation else cfg.seed
    streams = [_stream(s, i, cfg, tokenizer, seed) for i, s in enumerate(cfg.data.sources)]
    weights = [s.weight for s in cfg.data.sources]
    if evaluation:
        if cfg.data.heldout:
            total, streams = sum(s.count for s in streams), [s.held_out_part() for s in streams]
            if not sum(stream.count for stream in streams):
                raise UserError(f"data.heldout: a share of {cfg.data.heldout} holds none of the {total} documents out")
        streams = [stream.split(shard, shards, empty_ok=True) for stream in streams]
        return Mixture(streams, weights, cfg.seq_len, rows, cfg.model.max_seq_len, epochs=1, once=True)
    streams = [stream.split(shard, shards) for stream in streams]
    budget = cfg.data.token_budget // shards if cfg.data.token_budget else 0
    repeat = cfg.data.on_source_end == "repeat"
    return Mixture(streams, weights, cfg.seq_len, rows, cfg.model.max_seq_len, cfg.data.epochs, budget, repeat)


def mixture_tokens(cfg: TrainConfig) -> int | None:
    """Tokens (BOS and EOS included) the data yields before it ends, from prepared manifests' exact counts;
    None when the data does not end (no epochs or budget) or its size is unknown (raw sources)."""
    d = cfg.data
    if d.kind != "cpt":
        return None
    if not d.epochs:
        return d.token_budget or None
    if any(s.format != "prepared" for s in d.sources):
        return d.token_budget or None  # raw sources are tokenized on the fly: their size is unknown
    per_source = []
    for source in d.sources:  # with data.heldout, an estimate: the held-out documents' lengths are not read
        manifest = PreparedDocuments(source.name, pathlib.Path(source.paths[0])).manifest
        per_source.append(d.epochs * (1 - d.heldout) * (manifest["tokens"] + 2 * manifest["documents"]))
    weights = np.asarray([s.weight for s in d.sources]) / sum(s.weight for s in d.sources)
    # the mixture takes source i's tokens at share w_i: it ends when the first (stop) or last (repeat) runs out
    ends = [tokens / w for tokens, w in zip(per_source, weights, strict=True)]
    total = int(max(ends) if d.on_source_end == "repeat" else min(ends))
    return min(total, d.token_budget) if d.token_budget else total
