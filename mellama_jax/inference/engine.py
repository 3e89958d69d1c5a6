"""Continuous batching on the decoder: a fixed number of slots, each with its own rows of one KV cache.

A request is prefilled alone (its prompt padded to a length bucket, all but its last token written to a small
cache), and its cache is copied into a free slot's rows between two decode steps (JetStream's prefill/insert).
One jitted step then feeds every slot its next token at that slot's own position, samples each with its own
settings and key, and writes each slot's key/value at its own index. A slot that finished, ran out of tokens or
was cancelled is free before the next step; an idle slot rides along at index 0, masked, untouched.

All device work runs on the engine's one thread; callers submit a `Request` and receive its events through the
`emit` callback they gave, on that thread: ("prompt", logprobs) when echo scoring was asked, ("token", id,
logprob, top) per new token, then ("done", "stop" | "length" | "cancelled"), or ("error", message).

Greedy tokens equal `generate`'s for the same prompt: the same prefill, the same position per fed token, the
same sampling (`sampling.sample_rows`) with the key `generate` gives prompt 0: fold_in(fold_in(key(seed), 0), i).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.sharding import NamedSharding, PartitionSpec

from mellama_jax.config import ModelConfig
from mellama_jax.inference.generate import PREFILL_CHUNK, Loaded, _prefill, bucket_length
from mellama_jax.inference.sampling import sample_rows
from mellama_jax.model.llama import CACHE_KV, cache_shape, init_cache, with_params
from mellama_jax.model.sharding import activation_mesh, spec

log = logging.getLogger(__name__)

CACHE_NAMES = {"k": CACHE_KV, "v": CACHE_KV, "segment_ids": ("batch", "length"), "index": ("batch",)}
TOP_LOGPROBS = 5  # the most alternatives a request may ask for per token (OpenAI's limit for completions)


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests already."""


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]  # token ids, BOS included
    max_tokens: int  # new tokens at most (0: score the prompt only, with `echo`)
    emit: Callable[[tuple], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    adapter: int = 0  # 0 = the base; i = the engine's i-th adapter
    echo: bool = False  # emit the prompt's own log-probabilities first
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False


@dataclasses.dataclass(frozen=True)
class Adapters:
    """LoRA adapters stacked for per-row use: {target: {"a": [n+1, L, *in, r], "b": [n+1, L, r, *out]}},
    index 0 all zeros (the base), each b scaled by its adapter's alpha / rank; ranks padded to the largest."""

    stack: dict


class Engine:
    def __init__(self, model: Loaded, slots: int, max_len: int, adapters: Adapters | None = None,
                 max_queue: int = 64):  # fmt: skip
        cfg = model.cfg
        if not 0 < max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be in 1..{cfg.max_seq_len} (the model's window), got {max_len}")
        self.model, self.slots, self.max_len, self.max_queue = model, slots, max_len, max_queue
        # What the programs read besides the cache: passed as arguments (a closure would embed them as constants).
        self.weights = {"params": model.params, "adapters": adapters.stack if adapters else {},
                        "scales": model.scales or {}}  # fmt: skip
        self.eos = np.asarray(model.eos_ids or (-1,), np.int32)
        self.buckets = _buckets(max_len)
        # The step runs on the first R slots, R the smallest of these holding every busy one (a free slot is
        # always the lowest): one request alone costs one row, not `slots`.
        self.row_options = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r < slots] + [slots]
        # ... and attends to the cache's first W slots, W the smallest of these past every busy slot's position:
        # short requests do not pay for the whole window (at 512, a third of the step's time).
        self.windows = sorted({w for w in (max_len >> 3, max_len >> 2, max_len >> 1) if w >= 64} | {max_len})

        # The cache leaves every program placed as it came in (left to the partitioner, segment ids came out
        # placed otherwise, and each program then compiled a second time for its own output).
        shapes = {"k": cache_shape(cfg, slots, max_len), "segment_ids": (slots, max_len), "index": (slots,)}
        shapes["v"] = shapes["k"]
        placed = {key: _placement(model.mesh, names, shapes[key]) for key, names in CACHE_NAMES.items()}
        checked = lambda f: checkify.checkify(f, errors=checkify.user_checks)  # noqa: E731
        self._steps = {
            w: jax.jit(checked(functools.partial(decode_step, cfg, w)), donate_argnums=1,
                       out_shardings=(None, (None,) * 4 + (placed,)))
            for w in self.windows
        }  # fmt: skip
        self._prefill = jax.jit(checked(self._prefill_fn), donate_argnums=1, out_shardings=(None, placed))

        def empty():  # one position per slot
            return {**init_cache(cfg, slots, max_len), "index": jnp.zeros((slots,), jnp.int32)}

        with activation_mesh(model.mesh):
            self.cache = jax.jit(empty, out_shardings=placed)()
        self._score = jax.jit(self._score_fn)
        # Host-side state per slot: its request, next token to feed, position, tokens produced.
        self.owner: list[Request | None] = [None] * slots
        self.token, self.index, self.count = (np.zeros(slots, np.int32) for _ in range(3))
        self.pending: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.thread: threading.Thread | None = None

    # ---- the jitted programs -------------------------------------------------------------------------------
    def _prefill_fn(self, weights, cache, tokens, n, slot, adapter):
        """The slot's rows of `cache` replaced by the first `n` of `tokens` [1, P] (the rest masked off)."""
        cfg, p = self.model.cfg, tokens.shape[1]
        positions = jnp.arange(p)[None]
        segments = (positions < n).astype(jnp.int32)
        model = functools.partial(forward, cfg, weights, adapter[None])
        small = _prefill(model, tokens, positions, segments, init_cache(cfg, 1, p), PREFILL_CHUNK)
        at = (0, slot, 0, 0, 0)
        k = jax.lax.dynamic_update_slice(cache["k"], small["k"], at)
        v = jax.lax.dynamic_update_slice(cache["v"], small["v"], at)
        row = jnp.zeros((1, self.max_len), jnp.int32).at[:, :p].set(segments)
        segment_ids = jax.lax.dynamic_update_slice(cache["segment_ids"], row, (slot, 0))
        return {"k": k, "v": v, "segment_ids": segment_ids, "index": cache["index"]}

    def _score_fn(self, weights, tokens, adapter):
        """log P of each next token of tokens [1, P] ([1, P - 1]), and the top alternatives at each position."""
        positions = jnp.arange(tokens.shape[1])[None]
        logits = forward(self.model.cfg, weights, adapter[None], tokens, positions)[0]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], top_ids, top_lp

    # ---- the loop ------------------------------------------------------------------------------------------
    def start(self, on_ready: Callable[[float | None, Exception | None], None] | None = None) -> None:
        """Starts the engine's thread. With `on_ready`, the thread first warms up (`warm_up`) and reports
        (seconds, None) or (None, error): compiled on the thread that runs them, the programs' first calls
        skip jax's per-thread dispatch set-up (0.7 s on the first request otherwise)."""

        def run():
            if on_ready is not None:
                try:
                    seconds = self.warm_up()
                except Exception as e:  # reported, and the engine stays down
                    on_ready(None, e)
                    return
                on_ready(seconds, None)
            self._loop()

        self.thread = threading.Thread(target=run, name="mellama-engine", daemon=True)
        self.thread.start()

    def warm_up(self) -> float:
        """Compiles the step and every bucket's prefill and scoring; returns the seconds it took."""
        began, params, zero = time.monotonic(), self.weights, jnp.int32(0)
        with activation_mesh(self.model.mesh):
            for p in self.buckets:
                tokens = jnp.zeros((1, p), jnp.int32)
                error, self.cache = self._prefill(params, self.cache, tokens, zero, zero, zero)
                error.throw()
                self._score(params, tokens, zero)
            for rows in self.row_options:
                for window in self.windows:
                    self._run_step(rows, window)
        return time.monotonic() - began

    def submit(self, request: Request) -> None:
        """Queues `request`; raises QueueFull when `max_queue` wait already. The caller has checked its length."""
        with self.wake:
            if len(self.pending) >= self.max_queue:
                raise QueueFull
            self.pending.append(request)
            self.wake.notify()

    def cancel(self, request: Request) -> None:
        """Frees `request`'s slot before the next step (or drops it from the queue)."""
        with self.wake:
            request.cancelled = True
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    def busy(self) -> int:
        return sum(r is not None for r in self.owner)

    def queued(self) -> int:
        return len(self.pending)

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.pending and not self.busy():
                    self.wake.wait()
                if self.stopping:
                    return
            try:
                self._admit()
                if self.busy():
                    self._run_step()
            except Exception as e:  # a device error fails the requests in flight, not the server
                log.exception("engine step failed")
                for slot, request in enumerate(self.owner):
                    if request is not None:
                        request.emit(("error", f"engine failure: {type(e).__name__}"))
                        self._free(slot)

    def _free(self, slot: int) -> None:
        self.owner[slot] = None
        self.index[slot] = self.count[slot] = self.token[slot] = 0

    def _admit(self) -> None:
        """Frees cancelled slots, then prefills queued requests into free slots."""
        for slot, request in enumerate(self.owner):
            if request is not None and request.cancelled:
                request.emit(("done", "cancelled"))
                self._free(slot)
        while True:
            with self.wake:
                free = [s for s, r in enumerate(self.owner) if r is None]
                if not self.pending or not free:
                    return
                request = self.pending.popleft()
            if request.cancelled:
                request.emit(("done", "cancelled"))
                continue
            try:
                self._insert(request, free[0])
            except Exception as e:
                log.exception("prefill failed")
                request.emit(("error", f"engine failure: {type(e).__name__}"))

    def _insert(self, request: Request, slot: int) -> None:
        params, ids = self.weights, np.asarray(request.prompt, np.int32)
        adapter = jnp.int32(request.adapter)
        with activation_mesh(self.model.mesh):
            if request.echo:
                p = _bucket(self.buckets, len(ids))
                tokens = jnp.asarray(np.pad(ids, (0, p - len(ids)))[None])
                logp, top_ids, top_lp = (np.asarray(x[0]) for x in self._score(params, tokens, adapter))
                n = len(ids) - 1
                request.emit(("prompt", logp[:n], top_ids[:n], top_lp[:n]))
            if request.max_tokens == 0:
                request.emit(("done", "length"))
                return
            p = _bucket(self.buckets, len(ids) - 1)
            tokens = np.pad(ids[:-1], (0, p - len(ids) + 1))[None]
            error, self.cache = self._prefill(params, self.cache, jnp.asarray(tokens), jnp.int32(len(ids) - 1),
                                              jnp.int32(slot), adapter)  # fmt: skip
        error.throw()
        self.owner[slot] = request
        self.token[slot], self.index[slot], self.count[slot] = ids[-1], len(ids) - 1, 0

    def _settings(self, rows: int) -> tuple[np.ndarray, ...]:
        requests = [r or Request([], 0, lambda _: None) for r in self.owner[:rows]]
        return (
            np.asarray([r.adapter for r in requests], np.int32),
            np.asarray([r.temperature for r in requests], np.float32),
            np.asarray([r.top_k for r in requests], np.int32),
            np.asarray([r.top_p for r in requests], np.float32),
            np.asarray([r.seed for r in requests], np.int32),
        )

    def _run_step(self, rows: int | None = None, window: int | None = None) -> None:
        if rows is None:
            busy = [s for s, r in enumerate(self.owner) if r is not None]
            rows = next(r for r in self.row_options if r > busy[-1])
            window = next(w for w in self.windows if w > max(self.index[s] for s in busy))
        adapter_ids, temperature, top_k, top_p, seeds = self._settings(rows)
        per_slot = (self.token[:rows], self.index[:rows], adapter_ids, temperature, top_k, top_p, seeds,
                    self.count[:rows])  # fmt: skip
        with activation_mesh(self.model.mesh):
            error, (new, logp, top_ids, top_lp, self.cache) = self._steps[window](
                self.weights, self.cache, *(jnp.asarray(x) for x in per_slot)
            )
        error.throw()
        self.steps += 1
        new, logp, top_ids, top_lp = (np.asarray(x) for x in (new, logp, top_ids, top_lp))
        for slot, request in enumerate(self.owner[:rows]):
            if request is None:
                continue
            token = int(new[slot])
            if request.cancelled:
                request.emit(("done", "cancelled"))
                self._free(slot)
                continue
            if token in self.eos and not request.ignore_eos:
                request.emit(("done", "stop"))
                self._free(slot)
                continue
            request.emit(("token", token, float(logp[slot]), top_ids[slot], top_lp[slot]))
            self.count[slot] += 1
            self.token[slot], self.index[slot] = token, self.index[slot] + 1
            if self.count[slot] >= request.max_tokens:
                request.emit(("done", "length"))
                self._free(slot)


def forward(cfg: ModelConfig, weights: dict, adapter_ids: jax.Array, *args, window: int | None = None):
    """The model on args (tokens, positions[, segments, cache]), row i with adapter `adapter_ids[i]`."""
    model = with_params(cfg, weights["params"])
    # each row's adapter gathered from the stack: {target: {"a": [L, B, *in, r], "b": [L, B, r, *out]}}
    rows = jax.tree.map(lambda s: jnp.moveaxis(jnp.take(s, adapter_ids, axis=0), 0, 1), weights["adapters"])
    return model(*args, row_adapters=rows or None, quant_scales=weights["scales"] or None, window=window)


def decode_step(cfg: ModelConfig, window: int, weights, cache, tokens, index, adapter_ids, temperature, top_k, top_p,
                seeds, counts):  # fmt: skip
    """Every slot fed its token at its own index (all below `window`): (new token, its log-prob, top ids, top
    log-probs, cache).

    All per-slot arguments are [rows]: the token to feed and its position, the adapter, the sampling settings,
    the seed and how many tokens the slot's request has had (its key is fold_in(fold_in(key(seed), 0), count)).
    """
    rows = tokens.shape[0]  # the cache's first rows (it may hold more slots, idle)
    ones = jnp.ones((rows, 1), jnp.int32)
    args = (tokens[:, None], index[:, None], ones, {**cache, "index": index})
    logits, new = forward(cfg, weights, adapter_ids, *args, window=window)
    cache = {**new, "index": cache["index"]}  # positions are kept on the host
    logits = logits[:, 0]
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 0), i))(seeds, counts)
    chosen = sample_rows(logits, keys, temperature, top_k, top_p)
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    return chosen, jnp.take_along_axis(logp, chosen[:, None], axis=-1)[:, 0], top_ids, top_lp, cache


def _placement(mesh, names: tuple, shape: tuple) -> NamedSharding:
    """The logical names' placement, with dimensions their mesh axes do not divide (slots fewer than the data
    replicas) left whole."""
    axes = [(a,) if isinstance(a, str) else a or () for a in spec(names)]
    kept = [a if dim % math.prod(mesh.shape[x] for x in a) == 0 else () for a, dim in zip(axes, shape, strict=True)]
    return NamedSharding(mesh, PartitionSpec(*(a or None for a in kept)))


def _buckets(max_len: int) -> list[int]:
    """Prefill lengths: generate.bucket_length's ladder (16, 32, 48, 64, 80, ...) below max_len, then max_len."""
    sizes, n = [], 16
    while n < max_len:
        sizes.append(n)
        n = bucket_length(n + 1)
    return [*sizes, max_len]


def _bucket(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)
