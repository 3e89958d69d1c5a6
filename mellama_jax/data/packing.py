"""What the CPT and SFT iterators share: the seeded epoch order, and batches of rows filled one at a time.

A subclass fills one row per `_fill_row` call and keeps everything that decides the next rows in
`self.state` (JSON); `_restore` re-reads whatever it holds in hand after `set_state`.
"""

from __future__ import annotations

import copy
import functools

import grain
import numpy as np

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


@functools.lru_cache(maxsize=64)
def shuffled(count: int, seed: int, epoch: int) -> grain.MapDataset:
    """The order of `count` items in `epoch`: a lazy seeded permutation (no index array is built)."""
    return grain.MapDataset.range(count).shuffle(seed=int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


class PackedBatches:
    """An iterator of packed batches {tokens, positions, segment_ids, loss_mask}, each [rows, seq_len] int32.

    Stops when `state["done"]` is set and nothing is left; the last batch is padded (segment 0).
    """

    rows: int
    seq_len: int
    state: dict

    def _fill_row(self, tokens: np.ndarray, positions: np.ndarray, segments: np.ndarray, mask: np.ndarray) -> None:
        raise NotImplementedError

    def _restore(self) -> None:
        """Re-reads what the restored state says is in hand."""

    def get_state(self) -> dict:
        return copy.deepcopy(self.state)

    def set_state(self, state: dict) -> None:
        self.state = copy.deepcopy(state)
        self._restore()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.state["done"]:
            raise StopIteration
        batch = {key: np.zeros((self.rows, self.seq_len), np.int32) for key in BATCH_KEYS}
        for row in range(self.rows):
            if self.state["done"]:
                break
            self._fill_row(*(batch[key][row] for key in BATCH_KEYS))
        if not batch["segment_ids"].any():
            raise StopIteration
        return batch
