"""A training run's checkpoints: the train state and each process's data position, saved in the background
every `checkpoint_every` steps into `run_dir/checkpoints/<step>/` (orbax `CheckpointManager`), and restored
exactly, resharded onto the current mesh. A save that fails stops the run with a one-line error naming the
last complete step; a step that does not restore is passed over for the one before and moved aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib

import jax
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from mellama_jax.errors import UserError
from mellama_jax.outdir import disk_full, remove_settled
from mellama_jax.training.distributed import anywhere

log = logging.getLogger(__name__)


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
        remove_settled(partial)
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
