"""The training loop: a run's start (lock, checks, restore or init), its steps, checkpoints and metrics.

`train(cfg)` runs or resumes a run in `cfg.run_dir`. The pure step it drives is `train.train_step`; with
`eval_every`, validation.py evaluates the params at step 0, at every multiple of it and at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import signal
import time

import jax
import tqdm
from jax.sharding import Mesh

from mellama_jax.checkpoint import LORA_CONFIG, find_params, restore_params
from mellama_jax.config import TrainConfig
from mellama_jax.data.cpt import cpt_batches, mixture_tokens
from mellama_jax.data.sft import sft_batches
from mellama_jax.data.synthetic import CountingBatches
from mellama_jax.errors import UserError
from mellama_jax.hardware import RUNNING_PEAK_TFLOPS
from mellama_jax.model.llama import train_flops_per_token
from mellama_jax.model.sharding import batch_sharding, make_mesh, process_rows
from mellama_jax.outdir import disk_full
from mellama_jax.training.checkpoints import (
    check_saves,
    finish_checkpoints,
    restore_run,
    run_manager,
    save_checkpoint,
    save_failure,
)
from mellama_jax.training.distributed import anywhere, initialize, together
from mellama_jax.training.metrics_log import MetricsLog
from mellama_jax.training.run_dir import (
    MODEL_CONFIG,
    RunLock,
    adopt_checkpoint_files,
    adopt_tokenizer,
    check_resume,
    check_run_dir,
    has_checkpoints,
    write_json,
)
from mellama_jax.training.step import TrainState, abstract_state, compile_step, init_state, schedule
from mellama_jax.training.validation import Evaluator, due, warn_if_changed

log = logging.getLogger(__name__)


def _peak_flops(cfg: TrainConfig) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((tflops * 1e12 for name, tflops in RUNNING_PEAK_TFLOPS.items() if name in kind), None)


def start_state(cfg: TrainConfig, mesh: Mesh, manager, data) -> tuple[int, TrainState]:
    """Resume from the latest complete checkpoint (and `data` at its position), else start fresh (from
    `init_from`'s params if given)."""
    abstract = abstract_state(cfg, mesh)
    restored = restore_run(manager, abstract)
    if restored is not None:
        step, state, data_state = restored
        data.set_state(data_state)
        log.info("resumed %s at step %d", cfg.run_dir, step)
        return step, state
    if not cfg.init_from:
        return 0, init_state(cfg, mesh)
    item_dir, subtree = init_params(cfg)
    try:
        params = restore_params(item_dir, abstract.params, subtree)
    except ValueError as e:
        raise UserError(f"init_from {cfg.init_from}: does not fit model config ({str(e)[:200]})") from None
    return 0, init_state(cfg, mesh, params)


def init_params(cfg: TrainConfig) -> tuple[pathlib.Path, tuple[str, ...]]:
    """Where `init_from`'s params lie: a converted checkpoint, or a training run's latest complete step
    (continued SFT from a CPT run); a missing path or a LoRA run (export it merged first) is refused."""
    try:
        return find_params(pathlib.Path(cfg.init_from))
    except UserError as e:
        raise UserError(f"init_from {e}") from None


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

    Before anything in `run_dir` changes, process 0 takes the run's lock (a second writer is refused) and
    the run is checked against what the folder already holds (a different model is refused). Whatever
    fails on one process stops all of them at the same point, never leaving the others waiting.
    """
    initialize(cfg.distributed)
    run_dir, lead = pathlib.Path(cfg.run_dir), jax.process_index() == 0
    check_run_dir(run_dir)
    if cfg.init_from and not has_checkpoints(run_dir):
        init_params(cfg)  # refused before run_dir is made
    lock = RunLock(run_dir)

    def claim() -> None:  # process 0 holds the lock; the others then check that they see it
        if lead:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()

    together(claim)
    try:
        together(lambda: None if lead else lock.check())
        together(lambda: check_resume(run_dir, cfg.model))  # under the lock: no run can slip in between
        return _run(resolve_steps(cfg), run_dir, lead)
    finally:
        lock.release()


def _start_outputs(cfg: TrainConfig, run_dir: pathlib.Path, start: int, lead: bool) -> MetricsLog:
    if lead:
        write_json(run_dir / MODEL_CONFIG, dataclasses.asdict(cfg.model))
        if cfg.lora:  # jax-to-hf reads the adapters' scale from it
            write_json(run_dir / LORA_CONFIG, dataclasses.asdict(cfg.lora))
        if cfg.init_from and start == 0:
            adopt_checkpoint_files(pathlib.Path(cfg.init_from), run_dir)
        if cfg.data.tokenizer and start == 0:  # the tokenizer the data is read with is the model's from now on
            adopt_tokenizer(cfg.data.tokenizer, run_dir)
        log.info("run %s: metrics.jsonl, loss.png and checkpoints/ there; watch with: tensorboard --logdir %s",
                 run_dir, run_dir / "tensorboard")  # fmt: skip
    return MetricsLog(run_dir, start, enabled=lead)


def _run(cfg: TrainConfig, run_dir: pathlib.Path, lead: bool) -> list[dict]:
    mesh = make_mesh(cfg.mesh)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.global_batch % split:  # each device holds whole rows of the global batch
        raise UserError(f"global_batch ({cfg.global_batch}) must be a multiple of data×fsdp = {split} devices")
    if (cfg.global_batch // cfg.micro_batches) % split:
        log.warning(
            "micro-batches of %d rows do not split over data×fsdp = %d devices: some get no rows, and the step runs"
            " slower than it could; raise global_batch or lower micro_batches",
            cfg.global_batch // cfg.micro_batches,
            split,
        )
    data = batches(cfg, *process_rows(mesh, cfg.global_batch))
    evaluators: list[Evaluator | None] = []  # its data is opened (and checked) before anything starts
    together(lambda: evaluators.append(Evaluator(cfg, mesh) if cfg.eval_every else None))
    manager = run_manager(run_dir, cfg.checkpoint_every, cfg.keep_checkpoints)
    start, state = start_state(cfg, mesh, manager, data)
    outputs: list[MetricsLog] = []
    together(lambda: outputs.append(_start_outputs(cfg, run_dir, start, lead)))
    metrics_log = outputs[0]
    if evaluators[0] is not None:
        warn_if_changed(metrics_log.evals, evaluators[0].set)
    stop: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: stop.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm.tqdm(total=cfg.steps, initial=start, disable=not lead, unit="step")
    try:
        _loop(cfg, mesh, state, data, start, manager, metrics_log, bar, stop, evaluators[0])
        finish_checkpoints(manager)
        metrics_log.close()
    except BaseException as e:
        with contextlib.suppress(Exception):  # already failing: the cleanup must not hide why
            finish_checkpoints(manager)
        with contextlib.suppress(Exception):
            metrics_log.close()
        if isinstance(e, OSError) and disk_full(e):  # it may first show in the metrics while a save fails behind
            raise save_failure(manager, e) from e
        raise
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return metrics_log.rows


def _loop(cfg: TrainConfig, mesh: Mesh, state: TrainState, data, start: int, manager, metrics_log: MetricsLog,
          bar: tqdm.tqdm, stop: list[int], evaluator: Evaluator | None) -> None:  # fmt: skip
    """Steps from `start`; every process's host-side failure is exchanged with the step's stop flags.

    A validation comes after its step's flags, so that the last step (which only they tell) gets one, and
    before its checkpoint: a checkpointed step never lacks its validation row, and a step redone after a
    kill had none kept. A signal skips it, or cuts it short (the grace time is for the save); the resumed run
    then does it first, as it does for step 0 and for any other due step whose row is missing.
    """
    step_fn, batch_sh = compile_step(cfg, mesh), batch_sharding(mesh)
    flops, peak = train_flops_per_token(cfg.model, cfg.seq_len) * cfg.global_batch * cfg.seq_len, _peak_flops(cfg)

    def fetch() -> dict | None:  # None once the data has ended
        local = next(data, None)
        return (
            None
            if local is None
            else {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}
        )

    def exchange(failure: Exception | None, *flags: bool) -> tuple[bool, ...]:
        *flags, failed = anywhere(*flags, failure is not None)
        if failed:
            raise failure or UserError("another process stopped the run (its error says why)")
        return tuple(flags)

    shown_val: dict[str, str] = {}

    def validate(step: int, state: TrainState) -> bool:  # False: a signal cut it short
        row, failure = evaluator(step, state.params, exchange, stop, state.lora), None
        if row is None:
            log.warning("signal: the validation of step %d is cut short; the resumed run does it first", step)
            return False
        try:
            metrics_log.write(row)
        except OSError as e:
            failure = e
        exchange(failure)
        log.info("step %d: validation loss %.4f, perplexity %.4g, over %d tokens",
                 step, row["val_loss"], row["val_ppl"], row["val_tokens"])  # fmt: skip
        shown_val["val"] = f"{row['val_loss']:.4f}"
        return True

    batch, failure, plot = None, None, False
    try:
        batch = fetch()
    except (UserError, OSError) as e:
        failure = e
    (ended,) = exchange(failure, start < cfg.steps and batch is None)  # one shard may end before another
    if ended:
        log.warning("the data ended at step %d; nothing left to train on", start)
    # a due step without its validation row (step 0, or one a signal stopped at); process 0 alone has the log
    missing = metrics_log.enabled and not metrics_log.validated(start)
    if evaluator is not None and due(cfg, start) and exchange(None, missing)[0] and not validate(start, state):
        return  # stopped by a signal: nothing new to save
    tick = time.perf_counter()
    for step in range(start, start if ended else cfg.steps):
        state, metrics = step_fn(state, batch)  # dispatched: the device runs it while the host goes on
        data_state, failure = data.get_state(), None  # the position after this step's batch, for its checkpoint
        try:
            if step + 1 < cfg.steps:
                batch = fetch()  # the next batch is built while this step computes
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            seconds, tick = now - tick, now
            row = {"step": step + 1, **metrics, "tokens_per_s": cfg.global_batch * cfg.seq_len / seconds}
            row["mfu"] = flops / seconds / (peak * jax.device_count()) if peak else None
            metrics_log.write(row)
            if plot:  # the last checkpoint's
                metrics_log.plot()
            shown = {"loss": f"{row['loss']:.4f}", **shown_val, "tok_s": f"{row['tokens_per_s']:.0f}"}
            bar.set_postfix(shown | ({"mfu": f"{row['mfu']:.1%}"} if peak else {}))
            bar.update()
            check_saves(manager)  # a background save that failed stops the run here
        except (UserError, OSError) as e:
            failure = e
        signalled, ended = exchange(failure, bool(stop), batch is None and step + 1 < cfg.steps)
        last = signalled or ended or step + 1 == cfg.steps
        if evaluator is not None and not signalled and (last or due(cfg, step + 1)):
            signalled = not validate(step + 1, state)
            last = last or signalled
            tick = time.perf_counter()  # its time is no training step's
        plot = save_checkpoint(manager, step + 1, state, data_state, force=last)
        if signalled:
            log.warning("signal %s: saved step %d, stopping", stop[0] if stop else "on another process", step + 1)
        if ended:
            log.info("the data ended: saved step %d, stopping", step + 1)
        if last:
            break
