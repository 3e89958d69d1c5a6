"""A training run's folder: one writer at a time, and a resume only into the run it already is.

- `RunLock`: `run.lock` holds the writer's host, pid and start time under an exclusive `flock` for the
  whole run. A second writer is refused naming the holder. The kernel drops the flock when its process
  dies (even by kill -9), so a lock file whose flock is free on this host is stale and is taken over
  with a warning; one written from another host is refused (its process cannot be checked from here).
- `check_resume`: a run folder is resumed only with the model it was trained with (compute settings
  aside). A mismatch is an error before anything in the folder is touched.
- `adopt_checkpoint_files`: a run started from a converted checkpoint carries that checkpoint's tokenizer
  and generation settings, so exporting the run gives a complete Hugging Face folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import pathlib
import shutil
import socket

from mellama_jax.config import COMPUTE_FIELDS, ModelConfig
from mellama_jax.config_file import read_model_config
from mellama_jax.data.tokenizer import TOKENIZER_FILES
from mellama_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK = "run.lock"
MODEL_CONFIG = "model_config.json"
GENERATION_CONFIG = "generation_config.json"


def _holder(text: str) -> dict:
    with contextlib.suppress(json.JSONDecodeError):
        found = json.loads(text)
        if isinstance(found, dict):
            return found
    return {}


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


class RunLock:
    """Held from `acquire()` to `release()`; `check()` tells another process of the same run that it is held."""

    def __init__(self, run_dir: pathlib.Path):
        self.path, self.fd = pathlib.Path(run_dir) / LOCK, None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.read(fd, 4096).decode(errors="replace"))
                os.close(fd)
                raise UserError(
                    f"{self.path.parent}: another mellama train writes this run ({_describe(holder)})"
                ) from None
            try:  # the file may have been released and removed between our open and our flock: take a fresh one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder, host = _holder(os.read(fd, 4096).decode(errors="replace")), socket.gethostname()
        if holder.get("host", host) != host:
            os.close(fd)
            raise UserError(
                f"{self.path}: held by {_describe(holder)}; it cannot be checked from {host}."
                " If that run has ended, delete the lock file"
            )
        if holder:
            log.warning("%s: taking over a stale lock (%s, which is gone)", self.path, _describe(holder))
        mine = {"host": host, "pid": os.getpid(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        os.close(self.fd)
        self.fd = None

    def check(self) -> None:
        """For the other processes of a multi-process run: process 0's lock must be visible from here."""
        if not self.path.is_file():
            raise UserError(
                f"{self.path}: process 0's lock is not visible here; run_dir must be on a shared filesystem"
            )


def check_run_dir(run_dir: pathlib.Path) -> None:
    """A folder we may train into: absent, or a folder that is not a converted checkpoint."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir {run_dir}: exists and is not a folder")
    if (run_dir / "params").is_dir() and not (run_dir / "checkpoints").is_dir():
        raise UserError(
            f"run_dir {run_dir}: is a converted checkpoint, not a run; use it as init_from with a new run_dir"
        )


def has_checkpoints(run_dir: pathlib.Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_resume(run_dir: pathlib.Path, model: ModelConfig) -> None:
    """Refuses to resume a run whose saved model differs from `model` in anything but compute settings."""
    saved_path = run_dir / MODEL_CONFIG
    if not (saved_path.is_file() and has_checkpoints(run_dir)):
        return
    saved = read_model_config(saved_path)
    differ = [
        f"model.{f.name}={getattr(model, f.name)!r} (the run has {getattr(saved, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in COMPUTE_FIELDS and getattr(model, f.name) != getattr(saved, f.name)
    ]
    if differ:
        raise UserError(
            f"run_dir {run_dir}: cannot resume with a different model: {', '.join(differ)};"
            " use the run's settings, or a new run_dir (with init_from to start from its weights)"
        )


def write_json(path: pathlib.Path, content: dict) -> None:
    """Written beside and renamed into place: a kill never leaves half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(partial, path)


def adopt_checkpoint_files(init_from: pathlib.Path, run_dir: pathlib.Path) -> None:
    """Copies init_from's tokenizer files and generation settings into the run (exports carry them)."""
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (init_from / name).is_file() and not (run_dir / name).exists():
            shutil.copy2(init_from / name, run_dir / name)
