"""SFT data: instruction records become packed rows whose loss covers the answers (+ EOS) only.

- Records: Me-LLaMA's `{"conversations": [{"from": "human"|"agent", "value": ...}, ...]}` (multi-turn:
  every agent turn is trained on, after the turns before it), or Alpaca's `{instruction, input, output}`.
- Templates wrap each prompt; answers are never wrapped:
  `raw` (the prompt as it is), `me-llama` ("Human: \\n{prompt}\\n\\nAssistant: \\n", DESIGN §1), and
  `llama2-chat` ("[INST] {prompt} [/INST]", with BOS before every turn as Llama-2 chat has it).
- A sample is BOS, then per turn the wrapped prompt (masked out of the loss) and the answer + EOS (trained).
- Over-long samples: the first prompt loses tokens from its left (the wrapper stays) until the sample
  fits, and is counted as truncated. A sample that cannot fit even so is skipped and counted. An answer
  is never cut.
- Packing: whole samples back to back, with segment ids and positions restarting per sample. A sample
  that does not fit the rest of a row starts the next one, and the rest of the row is padding.
- Order and state are the CPT mixture's: a seeded permutation per epoch, every S-th sample per data shard,
  and a JSON state (epoch, next, pending sample, counts) that resumes to the same batches.
- Held out: with `data.heldout`, training skips the records `packing.held_out` picks by their index in
  their source; an evaluation reads those (or all of `eval_data`), each once, in an order of seed 0.
"""

from __future__ import annotations

import logging

import numpy as np

from mellama_jax.config import TrainConfig
from mellama_jax.data.cpt import tokenizer_for
from mellama_jax.data.packing import PackedBatches, held_out, held_out_indices, shuffled
from mellama_jax.data.sources import LOGGED_SKIPS, BadRecord, Documents, open_documents
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.errors import UserError

log = logging.getLogger(__name__)

TEMPLATES = {  # name -> (prompt wrapper, BOS before every turn)
    "raw": ("{prompt}", False),
    "me-llama": ("Human: \n{prompt}\n\nAssistant: \n", False),
    "llama2-chat": ("[INST] {prompt} [/INST]", True),
}


def turns(record: dict, where: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of one record, checked."""
    if "conversations" in record:
        conversation = record["conversations"]
        if not isinstance(conversation, list) or not conversation or len(conversation) % 2:
            raise BadRecord(f"{where}: 'conversations' must be a non-empty list of human/agent turn pairs")
        for i, turn in enumerate(conversation):
            speaker = "human" if i % 2 == 0 else "agent"
            if not isinstance(turn, dict) or turn.get("from") != speaker or not isinstance(turn.get("value"), str):
                raise BadRecord(f"{where}: turn {i + 1} must be {{'from': '{speaker}', 'value': <string>}}")
        return [(conversation[i]["value"], conversation[i + 1]["value"]) for i in range(0, len(conversation), 2)]
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise BadRecord(f"{where}: 'input' must be a string")
        return [(record["instruction"] + (f"\n\n{extra}" if extra else ""), record["output"])]
    raise BadRecord(f"{where}: neither 'conversations' nor string 'instruction' and 'output' fields")


def encode(pairs: list[tuple[str, str]], template: str, tokenizer: Tokenizer, cut: int = 0) -> tuple[list, list]:
    """Token ids and loss mask of one sample; `cut` tokens dropped from the left of the first prompt."""
    wrapper, bos_every_turn = TEMPLATES[template]
    ids, mask = [], []
    for t, (prompt, answer) in enumerate(pairs):
        if t == 0 and cut:
            prompt = tokenizer.decode(tokenizer.encode(prompt, add_special=False)[cut:])
        if t == 0 or bos_every_turn:
            ids, mask = ids + [tokenizer.bos_id], mask + [0]
        prompt_ids = tokenizer.encode(wrapper.format(prompt=prompt), add_special=False)
        answer_ids = tokenizer.encode(answer, add_special=False) + [tokenizer.eos_id]
        ids, mask = ids + prompt_ids + answer_ids, mask + [0] * len(prompt_ids) + [1] * len(answer_ids)
    return ids, mask


class Samples:
    """The records of all SFT sources, as token ids + loss mask that fit `max_len`."""

    def __init__(self, sources: list[Documents], template: str, tokenizer: Tokenizer, max_len: int):
        self.sources, self.template, self.tokenizer, self.max_len = sources, template, tokenizer, max_len
        self.starts = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[Documents, int]:
        source = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.sources[source], i - int(self.starts[source])

    def where(self, i: int) -> str:
        docs, local = self._locate(i)
        return docs.where(local)

    def held_out(self, i: int, share: float) -> bool:
        """Whether sample i is in its source's held-out `share`."""
        return bool(held_out(self._locate(i)[1], share)[0])

    def get(self, i: int) -> tuple[tuple[list, list] | None, str]:
        """(ids, mask), or None for a skipped record; and "", "truncated" or "too long"."""
        docs, local = self._locate(i)
        record = docs.get(local)
        if record is None:
            return None, ""
        try:
            pairs = turns(record, docs.where(local))
        except BadRecord as e:
            return docs.reject(str(e)), ""
        ids, mask = encode(pairs, self.template, self.tokenizer)
        if len(ids) <= self.max_len:
            return (ids, mask), ""
        first_prompt = len(self.tokenizer.encode(pairs[0][0], add_special=False))
        cut = 0
        while len(ids) > self.max_len and cut < first_prompt:
            cut = min(first_prompt, cut + len(ids) - self.max_len)
            ids, mask = encode(pairs, self.template, self.tokenizer, cut)
        return ((ids, mask), "truncated") if len(ids) <= self.max_len else (None, "too long")


class HeldOut:
    """The samples that `share` holds out of training, as a collection of their own (for validation)."""

    def __init__(self, samples: Samples, share: float):
        self.samples = samples
        picked = [held_out_indices(len(docs), share) for docs in samples.sources]  # by index in their source
        self.picked = np.concatenate([start + p for start, p in zip(samples.starts, picked, strict=False)])

    def __len__(self) -> int:
        return len(self.picked)

    def where(self, i: int) -> str:
        return self.samples.where(int(self.picked[i]))

    def get(self, i: int) -> tuple[tuple[list, list] | None, str]:
        return self.samples.get(int(self.picked[i]))


class SFTBatches(PackedBatches):
    """Packed SFT batches of whole samples, less the `heldout` share."""

    def __init__(self, samples: Samples | HeldOut, seq_len: int, rows: int, seed: int, shard: int, shards: int,
                 epochs: int, heldout: float = 0.0):  # fmt: skip
        self.samples, self.seq_len, self.rows, self.seed, self.epochs = samples, seq_len, rows, seed, epochs
        self.shard, self.shards, self.length = shard, shards, len(range(shard, len(samples), shards))
        self.heldout = heldout
        self.set_state({"epoch": 0, "next": 0, "pending": None, "done": False, "truncated": 0, "too_long": 0})

    def _restore(self) -> None:
        self.hand = None
        if self.state["pending"] is not None:  # the sample that did not fit the last row, read again
            epoch, k = self.state["pending"]
            self.hand = self.samples.get(self._position(epoch, k))[0]

    def _position(self, epoch: int, k: int) -> int:
        return int(shuffled(len(self.samples), self.seed, epoch)[k * self.shards + self.shard])

    def _take(self) -> tuple[list, list] | None:
        """The next sample that fits, put in hand (state "pending"); None when the data has ended."""
        misses = 0
        while True:
            s = self.state
            if s["next"] == self.length:
                if self.epochs and s["epoch"] + 1 >= self.epochs:
                    return None
                s["epoch"], s["next"] = s["epoch"] + 1, 0
            if misses > self.length:  # a whole pass without a sample to train on: no pass ever has one
                raise UserError("data: no SFT record of this shard is left to train on (held out, malformed or "
                                "longer than seq_len)")  # fmt: skip
            k, s["next"] = s["next"], s["next"] + 1
            position = self._position(s["epoch"], k)
            if self.heldout and self.samples.held_out(position, self.heldout):  # for validation: never trained on
                misses += 1
                continue
            sample, note = self.samples.get(position)
            if note:
                key = "truncated" if note == "truncated" else "too_long"
                s[key] += 1
                if s[key] <= LOGGED_SKIPS:  # then only counted, in the checkpointed data state
                    what = "cut its prompt from the left" if key == "truncated" else "skipped it: the answers alone"
                    log.warning(
                        "SFT sample %s longer than seq_len %d: %s", self.samples.where(position), self.seq_len, what
                    )
            if sample is not None:
                s["pending"], self.hand = [s["epoch"], k], sample
                return sample
            misses += 1

    def _fill_row(self, tokens: np.ndarray, positions: np.ndarray, segments: np.ndarray, mask: np.ndarray) -> None:
        t, segment = 0, 0
        while True:
            sample = self.hand if self.state["pending"] else self._take()
            if sample is None:
                self.state["done"] = True
                return
            ids, loss = sample
            if len(ids) > self.seq_len - t:  # kept in hand for the next row
                return
            segment += 1
            tokens[t : t + len(ids)], mask[t : t + len(ids)] = ids, loss
            positions[t : t + len(ids)], segments[t : t + len(ids)] = np.arange(len(ids)), segment
            t, self.state["pending"], self.hand = t + len(ids), None, None


def sft_batches(cfg: TrainConfig, first_row: int, rows: int, evaluation: bool = False) -> SFTBatches:
    """This process's rows of every global batch of the SFT records the config names.

    With `evaluation`, the records are read for validation: the held-out share if `data.heldout` (else all),
    each once, in the same order whatever the run's seed; a process whose share is empty gets padding.
    """
    tokenizer = tokenizer_for(cfg)
    sources = []
    for source in cfg.data.sources:
        if source.format not in ("", "jsonl", "array_record", "tfds"):
            raise UserError(f"source {source.name}: SFT records are JSONL, array_record or tfds, not {source.format}")
        fmt, on_error = source.format, cfg.data.on_error
        sources.append(open_documents(source.name, source.paths, fmt, "", on_error, source.split, source.data_dir))
    samples = Samples(sources, cfg.data.template, tokenizer, cfg.seq_len)
    shard, shards, heldout = first_row // rows, cfg.global_batch // rows, cfg.data.heldout
    if evaluation:
        picked = HeldOut(samples, heldout) if heldout else samples
        if not len(picked):
            raise UserError(f"data.heldout: a share of {heldout} holds none of the {len(samples)} SFT records out")
        return SFTBatches(picked, cfg.seq_len, rows, 0, shard, shards, epochs=1)
    if len(samples) < shards:
        raise UserError(f"data: {len(samples)} SFT records cannot feed {shards} data shards")
    return SFTBatches(samples, cfg.seq_len, rows, cfg.seed, shard, shards, cfg.data.epochs, heldout)
