"""Orbax checkpoints of parameter trees, written without ever holding a whole stacked tensor.

A converted 70B model has [L, ...] tensors of tens of GB. `Stacked` is a lazy leaf that produces one
layer slice at a time; its handler writes each slice into an ordinary orbax array (OCDBT + zarr,
one chunk per layer), so a normal orbax restore reads it back, resharded onto any mesh. Orbax writes
into a temporary folder and renames it on commit: a half-written checkpoint is never picked up.
`StoredArray` is the way back out: it reads one layer slice of a saved array at a time.

A CKPT_DIR is anything we write (DESIGN §4):
- a converted checkpoint: `params/` (orbax) + `model_config.json` (+ tokenizer files);
- a training run: `checkpoints/<step>/state/` (orbax `CheckpointManager`, a `TrainState` tree whose
  `params` subtree is the model) + `model_config.json` (+ tokenizer files) at the top; how a run saves
  and restores its state is `training/checkpoints.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import threading
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import type_handlers as th

from mellama_jax.errors import UserError

log = logging.getLogger(__name__)

LORA_CONFIG = "lora_config.json"  # a LoRA run's LoraConfig, in its run_dir: find_params reads its adapters


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
