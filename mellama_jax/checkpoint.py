"""Orbax checkpoints of parameter trees, written without ever holding a whole stacked tensor.

A converted 70B model has [L, ...] tensors of tens of GB. `Stacked` is a lazy leaf that produces one
layer slice at a time; its handler writes each slice into an ordinary orbax array (OCDBT + zarr,
one chunk per layer), so a normal orbax restore reads it back, resharded onto any mesh. Orbax writes
into a temporary folder and renames it on commit: a half-written checkpoint is never picked up.
`StoredArray` is the way back out: it reads one layer slice of a saved array at a time.

A CKPT_DIR is anything we write (DESIGN §4):
- a converted checkpoint: `params/` (orbax) + `model_config.json` (+ tokenizer files);
- a training run: `checkpoints/<step>/state/` (orbax `CheckpointManager`, a `TrainState` tree whose
  `params` subtree is the model) + `model_config.json` (+ tokenizer files) at the top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import shutil
import threading
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils
from orbax.checkpoint import type_handlers as th

from mellama_jax.distributed import anywhere
from mellama_jax.errors import UserError
from mellama_jax.lora import LORA_CONFIG
from mellama_jax.outdir import disk_full

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Stacked:
    """A [L, ...] array made one leading-axis slice at a time by `get_slice(i)`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    get_slice: Callable[[int], np.ndarray]


class _StackedHandler(th.NumpyHandler):
    def typestr(self) -> str:
        return "np.ndarray"  # stored as a plain array: restores like any other

    async def _write(self, values, infos, args) -> None:
        for value, info, arg in zip(values, infos, args, strict=True):
            await info.await_path_creation()
            ocdbt = info.is_ocdbt_checkpoint
            spec = th.get_json_tspec_write(
                info,
                use_ocdbt=ocdbt,
                global_shape=value.shape,
                local_shape=(1, *value.shape[1:]),  # chunks never straddle layers
                dtype=value.dtype,
                process_index=jax.process_index() if ocdbt else None,
                arg=arg,
            )
            if jax.process_index() != 0:
                continue
            array = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
            writing = None  # slice i is made while slice i-1 is written: two in memory at most
            for i in range(value.shape[0]):
                piece = np.asarray(value.get_slice(i), dtype=value.dtype)
                if piece.shape != value.shape[1:]:
                    raise ValueError(f"{info.name}[{i}]: shape {piece.shape}, expected {value.shape[1:]}")
                if writing is not None:
                    await writing
                writing = array[i].write(piece, can_reference_source_data_indefinitely=True)
            if writing is not None:
                await writing

    async def serialize(self, values, infos, args=None):
        args = args or [th.SaveArgs()] * len(values)
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._write(values, infos, args), name="stacked")]


def save_params(directory: pathlib.Path, tree: dict) -> None:
    """Saves a tree of numpy arrays and `Stacked` leaves synchronously; peak memory is about one slice."""
    handlers = [(t, th.get_type_handler(t)) for t in th.supported_types()]
    registry = th.create_type_handler_registry(*handlers, (Stacked, _StackedHandler()))
    # A failed write (a full disk: tensorstore's ValueError) is raised while orbax's other writer threads go
    # on. The caller reports it in one line; the threads are waited for, so removing the folder is final.
    running = set(threading.enumerate())
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as checkpointer:
            checkpointer.save(pathlib.Path(directory).absolute(), args=ocp.args.PyTreeSave(tree))
    except Exception:
        for thread in set(threading.enumerate()) - running:
            if not thread.daemon:  # the writers; they would hold the process at exit anyway
                thread.join(timeout=600)
        raise


def restore_params(directory: pathlib.Path, target=None, subtree: tuple[str, ...] = ()) -> dict:
    """The saved tree: with a target of ShapeDtypeStructs carrying shardings, placed and resharded accordingly;
    without one, as host numpy arrays (whatever devices or processes wrote it). With a target, `subtree` reads
    only that part of the tree (a training run's params, not its optimizer moments; see `find_params`)."""
    directory = pathlib.Path(directory).absolute()
    if target is not None and subtree:
        for key in reversed(subtree):
            target = {key: target}
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory, args=args)
        for key in subtree:
            restored = restored[key]
        return restored
    if target is not None:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(directory, target)
    tree = ocp.PyTreeCheckpointHandler().metadata(directory).tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


@dataclasses.dataclass(frozen=True)
class StoredArray:
    """An array in an orbax checkpoint, read on demand: `[i]` reads one leading-axis slice, `np.asarray` all."""

    store: ts.TensorStore

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.store.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.store.dtype.numpy_dtype)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.store[i].read().result()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.store.read().result()
        return array if dtype is None else array.astype(dtype)


def stored_arrays(item_dir: pathlib.Path, subtree: tuple[str, ...] = ()) -> dict:
    """The arrays of a saved pytree (or of one subtree of it) as `StoredArray`s; no data is read yet."""
    item_dir = pathlib.Path(item_dir).absolute()
    tree = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
    for key in subtree:
        tree = tree[key]
    ocdbt = th.is_ocdbt_checkpoint(item_dir)
    zarr3 = json.loads((item_dir / "_METADATA").read_text()).get("use_zarr3", False)
    context = th.get_ts_context(use_ocdbt=ocdbt)

    def open_leaf(meta) -> StoredArray:
        info = th.ParamInfo(
            name=meta.name, parent_dir=item_dir, is_ocdbt_checkpoint=ocdbt, use_zarr3=zarr3, ts_context=context
        )
        spec = th.get_json_tspec_read(info, use_ocdbt=ocdbt)
        return StoredArray(ts.open(spec, open=True, read=True, context=context).result())

    return jax.tree.map(open_leaf, tree)


def find_params(ckpt_dir: pathlib.Path, adapters: bool = False) -> tuple[pathlib.Path, tuple[str, ...]]:
    """A CKPT_DIR's orbax item folder holding the params, and the params' path inside that tree.

    A LoRA run's params are its frozen base: refused unless the caller also reads the adapters (`adapters`).
    """
    ckpt_dir = pathlib.Path(ckpt_dir)
    if (ckpt_dir / "params" / "_METADATA").is_file():
        return ckpt_dir / "params", ()
    if not adapters and (ckpt_dir / LORA_CONFIG).is_file():
        raise UserError(f"{ckpt_dir}: a LoRA run, whose params are the frozen base; merge its adapters first"
                        " (mellama convert jax-to-hf RUN HF_DIR, then hf-to-jax HF_DIR CKPT_DIR)")  # fmt: skip
    if (ckpt_dir / "checkpoints").is_dir():
        steps = ocp.utils.checkpoint_steps(ckpt_dir / "checkpoints")  # only finalized (committed) steps
        if steps:
            return ckpt_dir / "checkpoints" / str(max(steps)) / "state", ("params",)
        raise UserError(f"{ckpt_dir / 'checkpoints'}: no complete checkpoint step")
    raise UserError(f"{ckpt_dir}: not a converted checkpoint (params/) or a training run (checkpoints/)")


def run_manager(run_dir: pathlib.Path, every: int, keep: int) -> ocp.CheckpointManager:
    """Async checkpoints in `run_dir/checkpoints`: one every `every` steps, the last `keep` kept."""
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=True)
    return ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "checkpoints", options=options)


class DataState:
    """A data iterator's position, stored the way grain's checkpoint handler stores iterators: one JSON file
    per process (`data/process_<i>-of-<n>.json`), since each process reads its own shard of the data."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:  # the handler calls this on restore; the loop fetches by itself
        pass


def save_run(manager: ocp.CheckpointManager, step: int, state, data_state: dict, force: bool = False) -> bool:
    """Starts saving the train state and this process's data position at `step` (in the background).

    Arrays of the layer stack (params and their optimizer moments, [L, ...]) are chunked one layer per
    chunk, so a reader of one layer (jax-to-hf) reads only that layer.
    """
    per_layer = lambda path, _: ocp.SaveArgs(shard_axes=(0,) if "layers" in _keys(path) else ())  # noqa: E731
    save_args = jax.tree_util.tree_map_with_path(per_layer, state)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state, save_args=save_args),
        data=grain_checkpoint.CheckpointSave(DataState(data_state)),
    )
    return manager.save(step, args=args, force=force)


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _keys(path) -> set[str]:
    return {_key(k) for k in path}


def check_saves(manager: ocp.CheckpointManager) -> None:
    """Raises the one-line error of a background save that has failed."""
    try:
        manager.check_for_errors()
    except Exception as e:  # orbax and tensorstore raise many types; all of them mean that save is lost
        raise save_failure(manager, e) from e


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, data_state: dict, force: bool = False) -> bool:
    """`save_run`, with a failure (of this save or of the one before) as a one-line error."""
    try:
        return save_run(manager, step, state, data_state, force)
    except Exception as e:
        raise save_failure(manager, e) from e


def finish_checkpoints(manager: ocp.CheckpointManager) -> None:
    """Waits for the last save and closes the manager; a failed save is a one-line error."""
    try:
        manager.wait_until_finished()
        manager.check_for_errors()
    except Exception as e:
        raise save_failure(manager, e) from e
    finally:
        manager.close()


def save_failure(manager: ocp.CheckpointManager, error: Exception) -> UserError:
    """The one-line error of a run stopped by a failed save or a full disk, naming the last complete step."""
    with contextlib.suppress(Exception):  # the save in flight ends (or fails) before its folder is cleaned
        manager.wait_until_finished()
    folder = pathlib.Path(str(manager.directory))
    for partial in folder.glob("*.orbax-checkpoint-tmp*"):  # the failed save's half-written step
        shutil.rmtree(partial, ignore_errors=True)
    steps = ocp.utils.checkpoint_steps(folder) if folder.is_dir() else []
    last = f"the last complete checkpoint is step {max(steps)}" if steps else "no checkpoint is complete"
    if disk_full(error):
        return UserError(f"{folder.parent}: disk full; {last}, and the run stops there")
    reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
    return UserError(f"{folder}: saving a checkpoint failed ({reason}); {last}, and the run stops")


def restore_run(manager: ocp.CheckpointManager, abstract_state) -> tuple[int, object, dict] | None:
    """The latest complete step that restores, resharded as `abstract_state`'s shardings say.

    A step whose saved shapes differ from `abstract_state`'s is refused (a config mismatch, not damage).
    A step that fails to read (on any process: they decide together) is passed over for the one before.
    Once an older step restores, the failed ones are moved aside to `<step>.unreadable` (kept for
    inspection, out of the way of new saves) with a warning. If no step restores, nothing is moved: the
    cause may be this machine (memory, filesystem, mesh), not the checkpoints.
    """
    failed: list[tuple[pathlib.Path, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        folder = pathlib.Path(str(manager.directory)) / str(step)
        _check_process_count(folder / "data")
        data, error = DataState(), None
        try:
            _check_shapes(folder / "state", abstract_state)
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=grain_checkpoint.CheckpointRestore(data)
            )
            found = manager.restore(step, args=args)
        except UserError:
            raise
        except Exception as e:  # damage, or this machine: orbax/tensorstore raise many types
            error = e
        if anywhere(error is not None)[0]:
            failed.append((folder, (str(error).splitlines() or [""])[0][:200] if error else "on another process"))
            continue
        _move_aside(manager, failed)
        return step, found.state, data.state
    if failed:
        folder, reason = failed[0]
        raise UserError(
            f"{folder.parent}: no checkpoint restores (step {folder.name}: {reason}); nothing was moved aside"
        )
    return None


def _move_aside(manager: ocp.CheckpointManager, failed: list[tuple[pathlib.Path, str]]) -> None:
    for folder, reason in failed:
        aside = _unused(folder.with_name(f"{folder.name}.unreadable"))
        log.warning("checkpoint %s does not restore (%s); moved to %s", folder, reason, aside.name)
        if jax.process_index() == 0:
            folder.rename(aside)
    if failed:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mellama: unreadable checkpoints moved aside")
        manager.reload()


def _check_shapes(item_dir: pathlib.Path, abstract_state) -> None:
    """Refuses a saved state whose arrays differ in path or shape from the state this config makes.

    A metadata file that does not read is damage, and raises what orbax raises (not a UserError).
    """
    saved = dict(_flat_shapes(ocp.PyTreeCheckpointHandler().metadata(item_dir.absolute()).tree))
    wanted = dict(_flat_shapes(abstract_state))
    for path in sorted(set(saved) | set(wanted), key=lambda p: (not p.startswith("params/"), p)):  # params first
        if saved.get(path) != wanted.get(path):
            has = "nothing" if path not in saved else f"shape {saved[path]}"
            want = "nothing" if path not in wanted else f"shape {wanted[path]}"
            raise UserError(
                f"{item_dir.parent}: the saved state has {has} at {path}, this config needs {want}"
                " (was the run started with another model or optimizer?)"
            )


def _flat_shapes(tree) -> list[tuple[str, tuple[int, ...]]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(_key(k) for k in path), tuple(leaf.shape)) for path, leaf in leaves]


def _check_process_count(data_dir: pathlib.Path) -> None:
    written = sorted(data_dir.glob("process_0-of-*.json"))
    count = jax.process_count()
    if written and written[0].name != f"process_0-of-{count}.json":
        raise UserError(
            f"{data_dir.parent}: written by {written[0].stem.split('-of-')[1]} processes; the data position of"
            f" each process's shard cannot be resumed with {count} (restart with the same number of processes)"
        )


def _unused(path: pathlib.Path) -> pathlib.Path:
    n = 1
    while path.exists():
        n += 1
        path = path.with_name(f"{path.name.split('~')[0]}~{n}")
    return path
