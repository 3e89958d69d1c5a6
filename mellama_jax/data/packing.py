"""What the CPT and SFT iterators share: the seeded epoch order, the held-out split, and batches of rows
filled one at a time.

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


def held_out(indices: np.ndarray, share: float) -> np.ndarray:
    """Whether each document index of a source falls in its held-out `share` (`data.heldout`), as a bool array.

    A hash of the index alone (splitmix64's output for it, mapped to [0, 1)) decides: the split is the same
    whatever the seed, the number of processes or where a run resumed, and it needs no list of documents.
    """
    x = (np.atleast_1d(indices).astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)) < np.uint64(share * 2**53)


def held_out_indices(count: int, share: float, chunk: int = 1 << 22) -> np.ndarray:
    """The indices < `count` that `held_out` picks, in order; counted in chunks (a corpus may hold 10^8 documents)."""
    found = [start + np.flatnonzero(held_out(np.arange(start, min(count, start + chunk)), share))
             for start in range(0, count, chunk)]  # fmt: skip
    return np.concatenate(found) if found else np.zeros(0, np.int64)


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
