"""Validation during training: the loss on held-out data at the start, every `eval_every` steps, and at the end.

What is evaluated: `eval_data`, every document once, or without it `data.heldout`'s share of the training
documents, which the training stream skips (data/cpt.py, data/sft.py). `eval_batches` bounds it. Every
evaluation rewinds the eval iterator and so reads the same batches: the numbers compare across steps, and
across runs of other seeds too (the eval order does not depend on `seed`).

How: each process builds its rows of every global eval batch as it does for training, and the jitted
`train.eval_step` sums loss and target tokens over the whole mesh, a micro-batch at a time. Before every
batch the processes agree on whether any has rows left (one whose shard ran short feeds fully masked
rows) and whether any failed, so all call the step equally often and stop together. `val_loss` is the
mean cross-entropy per target token (the per-batch sums added in float64 on the host), `val_ppl` its exp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from mellama_jax.config import DataConfig, TrainConfig
from mellama_jax.data.cpt import cpt_batches
from mellama_jax.data.packing import BATCH_KEYS, PackedBatches
from mellama_jax.data.sft import sft_batches
from mellama_jax.errors import UserError
from mellama_jax.model.sharding import batch_sharding, process_rows
from mellama_jax.training.step import compile_eval

log = logging.getLogger(__name__)

# exchange(failure, *flags) -> flags: each flag or-ed over the processes; a failure on any one raises on all
Exchange = Callable[..., tuple[bool, ...]]


# `data.<field>` in a reader's message, not inside a path ("notes/data.tokenizer.json")
_DATA_FIELD = re.compile(rf"(?<![\w./-])data\.(?=(?:{'|'.join(f.name for f in dataclasses.fields(DataConfig))})\b)")


@contextlib.contextmanager
def naming_eval_data(cfg: TrainConfig) -> Iterator[None]:
    """Errors of the data readers, which say `data.`, name `eval_data.` when that is what they read."""
    try:
        yield
    except UserError as e:
        if cfg.eval_data is None:
            raise
        raise UserError(_DATA_FIELD.sub("eval_data.", str(e))) from None


def eval_batches(cfg: TrainConfig, first_row: int, rows: int) -> PackedBatches:
    """This process's rows of every global eval batch: `eval_data`'s, else `data.heldout`'s share of `data`."""
    data = cfg.eval_data or cfg.data
    data = dataclasses.replace(data, tokenizer=data.tokenizer or cfg.data.tokenizer)
    read = cpt_batches if data.kind == "cpt" else sft_batches
    with naming_eval_data(cfg):
        return read(dataclasses.replace(cfg, data=data), first_row, rows, evaluation=True)


def eval_set(cfg: TrainConfig) -> str:
    """A short name of what a validation reads and how it is batched (a row's `val_set`): val_loss values of
    different sets do not compare."""
    data = cfg.eval_data or cfg.data
    what = {"data": dataclasses.asdict(dataclasses.replace(data, tokenizer=data.tokenizer or cfg.data.tokenizer)),
            "batches": [cfg.eval_batches, cfg.global_batch, cfg.seq_len, cfg.model.max_seq_len]}  # fmt: skip
    if cfg.eval_data is None:  # the training data's held-out share: the options that only steer training aside
        what["data"] = {k: what["data"][k] for k in ("kind", "sources", "template", "tokenizer", "heldout")}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]


def warn_if_changed(evals: list[dict], current: str) -> None:
    """Says so when a resumed run validates on another set than its last validation row did."""
    earlier = evals[-1] if evals else None
    if earlier is not None and earlier.get("val_set", current) != current:
        log.warning("validation: the eval data or its batching (eval_data, data.heldout, eval_batches, global_batch,"
                    " seq_len) changed since step %d's validation: val_loss from here on does not compare with the rows"
                    " before (val_set %s, now %s)", earlier["step"], earlier["val_set"], current)  # fmt: skip


def due(cfg: TrainConfig, step: int) -> bool:
    """Whether `step` (the number of steps taken) is one a run with `eval_every` evaluates at, if it gets there."""
    return cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps)


class Evaluator:
    """Evaluates params on the same held-out batches every time it is called, on every process together."""

    def __init__(self, cfg: TrainConfig, mesh: Mesh):
        first_row, rows = process_rows(mesh, cfg.global_batch)
        self.data, self.limit, self.cfg = eval_batches(cfg, first_row, rows), cfg.eval_batches, cfg
        self.set = eval_set(cfg)
        self.start = self.data.get_state()
        self.step, self.sharding = compile_eval(cfg, mesh), batch_sharding(mesh)
        self.padding = {key: np.zeros((rows, cfg.seq_len), np.int32) for key in BATCH_KEYS}  # segment 0: no targets

    def __call__(
        self, step: int, params: dict, exchange: Exchange, stop: Sequence = (), adapters: dict | None = None
    ) -> dict | None:
        """The validation row of `step`: {"step", "val_loss", "val_ppl", "val_tokens", "val_set"}; None when a
        signal (`stop` not empty, on any process) cut it short: a whole evaluation may outlast the grace time for
        the save."""
        self.data.set_state(self.start)
        sums = []  # per batch (loss sum, target tokens), left on the device until the end: no sync per batch
        for _ in range(self.limit) if self.limit else itertools.count():
            local, failure = None, None
            try:
                with naming_eval_data(self.cfg):
                    local = next(self.data, None)
            except (UserError, OSError) as e:
                failure = e
            more, signalled = exchange(failure, local is not None, bool(stop))
            if signalled:
                return None
            if not more:
                break
            local = self.padding if local is None else local
            batch = {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in local.items()}
            sums.append(self.step(params, batch, adapters))  # adapters: a LoRA run's (TrainState.lora)
        sums = jax.device_get(sums)
        loss, tokens = sum(float(s) for s, _ in sums), sum(float(n) for _, n in sums)
        if not tokens:  # the same on every process: the sums are global
            raise UserError("validation: the eval data holds no target tokens (every record skipped?)")
        mean = loss / tokens
        ppl = math.inf if mean > 709 else math.exp(mean)  # exp overflows a float64 beyond 709
        return {"step": step, "val_loss": mean, "val_ppl": ppl, "val_tokens": int(tokens), "val_set": self.set}
