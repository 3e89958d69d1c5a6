"""A built-in corpus for demos and tests: packed rows of "counting" documents, learnable in a few steps.

Each document starts at a random token and counts up by one (mod the vocabulary), so the next token is
always predictable from the current one and the loss of a working trainer falls fast. Each row is a pure
function of (seed, step, global row index), so the global batch is the same however many processes
build it, and `get_state`/`set_state` need only the step: a resumed run sees exactly the batches it
would have seen.
"""

from __future__ import annotations

import numpy as np


class CountingBatches:
    """Packed batches {tokens, positions, segment_ids, loss_mask}: rows first_row .. first_row + rows - 1."""

    def __init__(self, vocab_size: int, seq_len: int, rows: int, seed: int = 0, first_row: int = 0):
        self.vocab_size, self.seq_len, self.rows = vocab_size, seq_len, rows
        self.seed, self.first_row, self.step = seed, first_row, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        t = self.seq_len
        tokens = np.zeros((self.rows, t), np.int32)
        segments, positions = np.zeros_like(tokens), np.zeros_like(tokens)
        for row in range(self.rows):
            rng = np.random.default_rng([self.seed, self.step, self.first_row + row])
            start, doc = 0, 1
            while start < t:
                length = min(int(rng.integers(t // 4, t + 1)), t - start)
                first = rng.integers(3, self.vocab_size)
                tokens[row, start : start + length] = 3 + (first - 3 + np.arange(length)) % (self.vocab_size - 3)
                segments[row, start : start + length] = doc
                positions[row, start : start + length] = np.arange(length)
                start, doc = start + length, doc + 1
        self.step += 1
        return {"tokens": tokens, "positions": positions, "segment_ids": segments, "loss_mask": np.ones_like(tokens)}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
