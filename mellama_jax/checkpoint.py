"""Orbax checkpoints of parameter trees, written without ever holding a whole stacked tensor.

A converted 70B model has [L, ...] tensors of tens of GB. `Stacked` is a lazy leaf that produces one
layer slice at a time; its handler writes each slice into an ordinary orbax array (OCDBT + zarr,
one chunk per layer), so a normal orbax restore reads it back, resharded onto any mesh. Orbax writes
into a temporary folder and renames it on commit: a half-written checkpoint is never picked up.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import type_handlers as th


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
        for value, info, arg in zip(values, infos, args, strict=True):  # one slice in flight at a time
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
            for i in range(value.shape[0]):
                piece = np.asarray(value.get_slice(i), dtype=value.dtype)
                if piece.shape != value.shape[1:]:
                    raise ValueError(f"{info.name}[{i}]: shape {piece.shape}, expected {value.shape[1:]}")
                await array[i].write(piece, can_reference_source_data_indefinitely=True)

    async def serialize(self, values, infos, args=None):
        args = args or [th.SaveArgs()] * len(values)
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._write(values, infos, args), name="stacked")]


def save_params(directory: pathlib.Path, tree: dict) -> None:
    """Saves a tree of numpy arrays and `Stacked` leaves synchronously; peak memory is about one slice."""
    handlers = [(t, th.get_type_handler(t)) for t in th.supported_types()]
    registry = th.create_type_handler_registry(*handlers, (Stacked, _StackedHandler()))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as checkpointer:
        checkpointer.save(pathlib.Path(directory).absolute(), args=ocp.args.PyTreeSave(tree))


def restore_params(directory: pathlib.Path, target=None) -> dict:
    """The saved tree; with a target of ShapeDtypeStructs carrying shardings, placed and resharded accordingly."""
    directory = pathlib.Path(directory).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(directory, target) if target is not None else checkpointer.restore(directory)
