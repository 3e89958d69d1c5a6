"""The pure, sharded training step: TrainState in, TrainState and metrics out.

Precision: fp32 master params and AdamW state, compute in `model.dtype` (bf16 for real runs), logits
and loss in fp32. A step accumulates gradients over `micro_batches` slices of the global batch and
divides by the number of target tokens in the whole batch, so it equals one big-batch step exactly
(up to summation order). A step whose gradients are not finite changes nothing but `skipped`.

Batches are dicts of [B, T] int arrays: `tokens`, `positions`, `segment_ids` (0 = padding) and
`loss_mask` (1 where the token is a training target). Token t+1 is the target at position t, never
across a document boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import pathlib
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx, struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mellama_jax.checkpoint import (
    checkpoint,
    find_params,
    finish_checkpoints,
    restore_params,
    restore_run,
    run_manager,
    save_failure,
)
from mellama_jax.config import TrainConfig
from mellama_jax.data.cpt import cpt_batches, mixture_tokens
from mellama_jax.data.sft import sft_batches
from mellama_jax.data.synthetic import CountingBatches
from mellama_jax.distributed import initialize
from mellama_jax.errors import UserError
from mellama_jax.metrics_log import MetricsLog
from mellama_jax.model import Llama, abstract_model, with_params
from mellama_jax.outdir import disk_full
from mellama_jax.plan import train_flops_per_token
from mellama_jax.run_dir import (
    MODEL_CONFIG,
    RunLock,
    adopt_checkpoint_files,
    check_resume,
    check_run_dir,
    has_checkpoints,
    write_json,
)
from mellama_jax.sharding import activation_mesh, batch_sharding, make_mesh, process_rows, shardings

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


class TrainState(struct.PyTreeNode):
    step: jax.Array  # [] int32, optimiser steps taken (skipped ones included)
    params: dict  # nested dict, as `nnx.to_pure_dict` gives it
    opt_state: optax.OptState
    rng: jax.Array  # a raw uint32 PRNG key, for stochastic parts of training
    skipped: jax.Array  # [] int32, steps whose gradients were not finite (not applied)


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `min_lr`."""
    o = cfg.optim
    warmup = round(o.warmup_ratio * cfg.steps)
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(cfg.steps, warmup + 1), o.min_lr)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip, then AdamW's direction with decoupled weight decay; `train_step` scales it by the schedule.

    The learning rate follows `TrainState.step` (skipped steps included), not the optimizer's own
    count, so a skipped step neither advances Adam's bias correction nor shifts the schedule.
    """
    o = cfg.optim

    def decay_mask(params):  # RMSNorm scales (paths ending in "scale") are decayed only if asked
        return jax.tree_util.tree_map_with_path(lambda path, _: o.decay_vectors or path[-1].key != "scale", params)

    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.scale_by_adam(o.b1, o.b2, o.eps),
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
    )


def loss_sums(cfg: TrainConfig, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens), in fp32."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    logits, _ = with_params(cfg.model, params)(tokens, batch["positions"], segments)
    targets = jnp.roll(tokens, -1, axis=1)
    same_doc = (jnp.roll(segments, -1, axis=1) == segments) & (segments != 0)
    not_last = jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1
    weight = (jnp.roll(batch["loss_mask"], -1, axis=1) != 0) & same_doc & not_last
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weight = weight.astype(jnp.float32)
    return (ce * weight).sum(), weight.sum()


def train_step(cfg: TrainConfig, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimiser step over the global batch, accumulated over `cfg.micro_batches` slices."""
    m = cfg.micro_batches
    sums_and_grads = jax.value_and_grad(lambda p, mb: loss_sums(cfg, p, mb), has_aux=True)

    def accumulate(carry, mb):
        grads, loss_sum, count = carry
        (s, n), g = sums_and_grads(state.params, mb)
        return (jax.tree.map(jnp.add, grads, g), loss_sum + s, count + n), None

    if m == 1:
        (loss_sum, count), grads = sums_and_grads(state.params, batch)
    else:  # row r goes to micro-batch r % m: each device's rows stay on it, whatever the batch sharding
        micro = jax.tree.map(lambda x: x.reshape(-1, m, *x.shape[1:]).swapaxes(0, 1), batch)
        zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
        (grads, loss_sum, count), _ = jax.lax.scan(accumulate, zeros, micro)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    grad_norm = optax.tree.norm(grads)
    lr = schedule(cfg)(state.step)
    finite = jnp.isfinite(grad_norm)

    def apply() -> tuple[dict, optax.OptState]:
        direction, opt_state = optimizer(cfg).update(grads, state.opt_state, state.params)
        return jax.tree.map(lambda p, d: p - lr * d, state.params, direction), opt_state

    # A cond, not a select: the skipped branch costs nothing, and a taken step no extra pass over the state.
    params, opt_state = jax.lax.cond(finite, apply, lambda: (state.params, state.opt_state))
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, skipped=state.skipped + (~finite).astype(jnp.int32)
    )
    metrics = {
        "loss": loss_sum / count,
        "grad_norm": grad_norm,
        "lr": lr,
        "target_tokens": count,
        "skipped": new_state.skipped,
    }
    return new_state, metrics


def _init(cfg: TrainConfig, seed: jax.Array) -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, rng = jax.random.split(key)
    params = nnx.to_pure_dict(nnx.state(Llama(cfg.model, rngs=nnx.Rngs(init_key)), nnx.Param))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer(cfg).init(params), rng=rng, skipped=zero)


def state_shardings(cfg: TrainConfig, mesh: Mesh):
    """NamedShardings for every TrainState leaf: params and their AdamW moments by logical name, the rest replicated."""
    abstract = jax.eval_shape(functools.partial(_init, cfg), 0)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract_model(cfg.model), nnx.Param)))
    params = shardings(abstract.params, logical, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optax.tree_map_params(
        optimizer(cfg), lambda _, s: s, abstract.opt_state, params, transform_non_params=lambda _: replicated
    )
    return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated, skipped=replicated)


def init_state(cfg: TrainConfig, mesh: Mesh) -> TrainState:
    """A fresh TrainState created already sharded: no parameter is ever whole on one device."""
    init = jax.jit(functools.partial(_init, cfg), out_shardings=state_shardings(cfg, mesh))
    return init(cfg.seed)


def compile_step(cfg: TrainConfig, mesh: Mesh) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step` jitted with explicit shardings; the input state is donated (updated in place)."""
    state_sh = state_shardings(cfg, mesh)
    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(
        functools.partial(train_step, cfg),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )

    def on_mesh(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with activation_mesh(mesh):  # traced here: the model's activations are pinned onto the mesh
            return step(state, batch)

    return on_mesh


# --- the loop ----------------------------------------------------------------------------------------
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}  # dense bf16, per device


def _peak_flops(cfg: TrainConfig) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((tflops * 1e12 for name, tflops in PEAK_TFLOPS.items() if name in kind), None)


def start_state(cfg: TrainConfig, mesh: Mesh, manager, data) -> tuple[int, TrainState]:
    """Resume from the latest complete checkpoint (and `data` at its position), else start fresh (from
    `init_from`'s params if given)."""
    shardings = state_shardings(cfg, mesh)
    shapes = jax.eval_shape(functools.partial(_init, cfg), 0)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    restored = restore_run(manager, abstract)
    if restored is not None:
        step, state, data_state = restored
        data.set_state(data_state)
        log.info("resumed %s at step %d", cfg.run_dir, step)
        return step, state
    state = init_state(cfg, mesh)
    if cfg.init_from:
        try:
            state = state.replace(params=restore_params(init_params(cfg), target=abstract.params))
        except ValueError as e:
            raise UserError(f"init_from {cfg.init_from}: does not fit model config ({str(e)[:200]})") from None
    return 0, state


def init_params(cfg: TrainConfig) -> pathlib.Path:
    """The orbax folder of `init_from`'s params; a missing path or a training run is refused."""
    try:
        item_dir, subtree = find_params(pathlib.Path(cfg.init_from))
    except UserError as e:
        raise UserError(f"init_from {e}") from None
    if subtree:
        raise UserError(f"init_from {cfg.init_from}: expected a converted checkpoint (params/), not a run")
    return item_dir


def _anywhere(*flags: bool) -> tuple[bool, ...]:
    """Whether each flag holds on any process (one exchange): all processes must save and stop at the same step."""
    if jax.process_count() == 1:
        return flags
    return tuple(bool(f) for f in multihost_utils.process_allgather(np.asarray(flags, np.int32)).any(axis=0))


def _together(action: Callable[[], object]) -> None:
    """Runs `action` here; if it fails on any process, every process stops (else the others would wait forever)."""
    error = None
    try:
        action()
    except (UserError, OSError) as e:
        error = e
    if _anywhere(error is not None)[0]:
        raise error or UserError("another process could not start the run (its error says why)")


def batches(cfg: TrainConfig, first_row: int, rows: int):
    """This process's rows of every global batch, from the configured data; `get_state`/`set_state` resume it."""
    if cfg.data.kind == "synthetic":
        return CountingBatches(cfg.model.vocab_size, cfg.seq_len, rows, cfg.seed, first_row)
    return (cpt_batches if cfg.data.kind == "cpt" else sft_batches)(cfg, first_row, rows)


def resolve_steps(cfg: TrainConfig) -> TrainConfig:
    """`steps: auto` made the number of steps the data covers; a fixed `steps` that disagrees with it is warned of."""
    tokens, per_step = mixture_tokens(cfg), cfg.global_batch * cfg.seq_len
    if tokens is None:
        if cfg.steps == "auto":
            raise UserError(
                "steps: auto needs a cpt mixture of prepared sources with data.epochs, or data.token_budget"
            )
        return cfg
    covered = max(1, math.ceil(tokens / per_step))
    warn = log.warning if jax.process_index() == 0 else log.debug  # every process computes it; one says so
    if cfg.steps == "auto":
        log.info(
            "steps: auto = %d (the data's %s tokens at %s tokens per step)", covered, f"{tokens:,}", f"{per_step:,}"
        )
        return dataclasses.replace(cfg, steps=covered)
    log.info("the data covers %d steps (%s tokens at %s per step); steps is %d", covered, f"{tokens:,}",
             f"{per_step:,}", cfg.steps)  # fmt: skip
    if covered < 0.99 * cfg.steps:
        lr = float(schedule(cfg)(covered))
        warn("the data ends near step %d of %d, where the learning rate is still %.3g; set steps: auto,"
             " or data.on_source_end: repeat", covered, cfg.steps, lr)  # fmt: skip
    elif covered > 1.01 * cfg.steps:
        warn("the run stops at step %d with %.0f%% of the data unread; set steps: auto to read it all",
             cfg.steps, 100 * (1 - cfg.steps / covered))  # fmt: skip
    return cfg


def train(cfg: TrainConfig) -> list[dict]:
    """Runs (or resumes) `cfg` to `cfg.steps` or the end of its data; SIGTERM/SIGINT save and stop cleanly.

    Before anything in `run_dir` changes, the run is checked against what the folder already holds (a
    different model is refused), and process 0 takes the run's lock (a second writer is refused).
    """
    initialize(cfg.distributed)
    run_dir, lead = pathlib.Path(cfg.run_dir), jax.process_index() == 0
    check_run_dir(run_dir)
    check_resume(run_dir, cfg.model)
    if cfg.init_from and not has_checkpoints(run_dir):
        init_params(cfg)  # refused before run_dir is made
    lock = RunLock(run_dir)

    def claim() -> None:
        if lead:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()

    _together(claim)  # process 0 holds the lock; the others then check that they see it
    try:
        _together(lambda: None if lead else lock.check())
        return _run(resolve_steps(cfg), run_dir, lead)
    finally:
        lock.release()


def _run(cfg: TrainConfig, run_dir: pathlib.Path, lead: bool) -> list[dict]:
    mesh = make_mesh(cfg.mesh)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.global_batch // cfg.micro_batches) % split:
        log.warning(
            "micro-batches of %d rows do not split over data×fsdp = %d devices: some get no rows, and the step runs"
            " slower than it could; raise global_batch or lower micro_batches",
            cfg.global_batch // cfg.micro_batches,
            split,
        )
    data = batches(cfg, *process_rows(mesh, cfg.global_batch))
    manager = run_manager(run_dir, cfg.checkpoint_every, cfg.keep_checkpoints)
    start, state = start_state(cfg, mesh, manager, data)
    if lead:
        write_json(run_dir / MODEL_CONFIG, dataclasses.asdict(cfg.model))
        if cfg.init_from and start == 0:
            adopt_checkpoint_files(pathlib.Path(cfg.init_from), run_dir)
        log.info("run %s: metrics.jsonl, loss.png and checkpoints/ there; watch with: tensorboard --logdir %s",
                 run_dir, run_dir / "tensorboard")  # fmt: skip
    step_fn, batch_sh = compile_step(cfg, mesh), batch_sharding(mesh)

    def fetch() -> dict | None:  # None once the data has ended
        local = next(data, None)
        return (
            None
            if local is None
            else {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}
        )

    metrics_log = MetricsLog(run_dir, start, enabled=lead)
    stop: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: stop.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    flops, peak = train_flops_per_token(cfg.model, cfg.seq_len) * cfg.global_batch * cfg.seq_len, _peak_flops(cfg)
    bar = tqdm.tqdm(total=cfg.steps, initial=start, disable=not lead, unit="step")
    finished = False
    try:
        batch, tick = fetch(), time.perf_counter()
        ended = start < cfg.steps and _anywhere(batch is None)[0]  # one process's shard may end before another's
        if ended:
            log.warning("the data ended at step %d; nothing left to train on", start)
        for step in range(start, start if ended else cfg.steps):
            state, metrics = step_fn(state, batch)  # dispatched: the device runs it while the host goes on
            data_state = data.get_state()  # the position after this step's batch, for its checkpoint
            if step + 1 < cfg.steps:
                batch = fetch()  # the next batch is built while this step computes
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            seconds, tick = now - tick, now
            row = {"step": step + 1, **metrics, "tokens_per_s": cfg.global_batch * cfg.seq_len / seconds}
            row["mfu"] = flops / seconds / (peak * jax.device_count()) if peak else None
            metrics_log.write(row)
            shown = {"loss": f"{row['loss']:.4f}", "tok_s": f"{row['tokens_per_s']:.0f}"}
            bar.set_postfix(shown | ({"mfu": f"{row['mfu']:.1%}"} if peak else {}))
            bar.update()
            signalled, ended = _anywhere(bool(stop), batch is None and step + 1 < cfg.steps)
            last = signalled or ended or step + 1 == cfg.steps
            if checkpoint(manager, step + 1, state, data_state, force=last):
                metrics_log.plot()
            if signalled:
                log.warning("signal %s: saved step %d, stopping", stop[0] if stop else "on another process", step + 1)
            if ended:
                log.info("the data ended: saved step %d, stopping", step + 1)
            if last:
                break
        finish_checkpoints(manager)
        finished = True
    except OSError as e:  # a full disk may first show in the metrics or the plot, while a save fails behind
        raise save_failure(manager, e) if disk_full(e) else e from e
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if not finished:  # already failing: the cleanup must not hide why
            with contextlib.suppress(Exception):
                finish_checkpoints(manager)
        with contextlib.suppress(Exception) if not finished else contextlib.nullcontext():
            metrics_log.close()
    return metrics_log.rows
