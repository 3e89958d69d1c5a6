"""A training run's folder: one writer at a time, and a resume only into the run it already is.

- `RunLock`: `run.lock` holds the writer's host, pid and start time under an exclusive `flock` for the
  whole run, and its holder touches it every `HEARTBEAT` seconds. A second writer is refused naming the
  holder. The kernel drops the flock when its process dies (even by kill -9), so a lock whose flock is
  free on this host is stale and is taken over with a warning. A lock from another host (a restarted
  container gets a new hostname) is taken over once its heartbeat has been silent for `STALE_AFTER`
  seconds; until then it is refused. On filesystems without flock, the pid (same host) or the heartbeat
  decides alone.
- `check_resume`: a run folder is resumed only with the model it was trained with (compute settings
  aside). A mismatch is an error before anything in the folder is touched.
- `adopt_checkpoint_files`: a run started from a converted checkpoint carries that checkpoint's tokenizer
  and generation settings, so exporting the run gives a complete Hugging Face folder; `adopt_tokenizer`
  copies `data.tokenizer` (the one the model is trained on) in the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import threading
import time

from mellama_jax.config import COMPUTE_FIELDS, ModelConfig
from mellama_jax.config_file import read_model_config
from mellama_jax.data.tokenizer import TOKENIZER_FILES, TOKENIZER_MODEL_FILES, load_tokenizer
from mellama_jax.errors import UserError
from mellama_jax.outdir import pid_alive, replace_file

log = logging.getLogger(__name__)

LOCK = "run.lock"
HEARTBEAT, STALE_AFTER = 30.0, 300.0  # seconds
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # e.g. Lustre or GPFS mounted without it
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

    def __init__(self, run_dir: pathlib.Path, writer: str = "mellama train writes this run"):
        self.path, self.fd, self.beating = pathlib.Path(run_dir) / LOCK, None, threading.Event()
        self.writer = writer  # how a refusal names the holder's work

    def _open_locked(self) -> tuple[int, bool]:
        """The lock file, opened and flocked (False: this filesystem has no flock)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise UserError(f"{self.path.parent}: another {self.writer} ({_describe(holder)})") from None
            except OSError as e:
                if e.errno in _NO_FLOCK:
                    return fd, False
                os.close(fd)
                raise
            try:  # the file may have been released and removed between our open and our flock: take a fresh one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd, True
            except FileNotFoundError:
                pass
            os.close(fd)

    def acquire(self) -> None:
        fd, flocked = self._open_locked()
        holder, host = _holder(os.pread(fd, 4096, 0).decode(errors="replace")), socket.gethostname()
        silent = time.time() - os.fstat(fd).st_mtime
        if holder.get("host", host) != host and silent < STALE_AFTER:
            os.close(fd)
            raise UserError(
                f"{self.path}: held by {_describe(holder)}, alive {silent:.0f} s ago; if that run has ended,"
                f" delete the file or retry after {STALE_AFTER:.0f} s of silence"
            )
        if holder.get("host") == host and not flocked and pid_alive(holder.get("pid")):
            os.close(fd)
            raise UserError(f"{self.path.parent}: another {self.writer} ({_describe(holder)})")
        if holder:
            log.warning("%s: taking over a stale lock (%s, which is gone)", self.path, _describe(holder))
        mine = {"host": host, "pid": os.getpid(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as e:  # a full disk: leave no empty lock and no open descriptor behind
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(fd)
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        self.fd = fd
        threading.Thread(target=self._beat, daemon=True, name="run.lock heartbeat").start()

    def _beat(self) -> None:
        while not self.beating.wait(HEARTBEAT):
            with contextlib.suppress(OSError):
                os.utime(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        self.beating.set()
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
    replace_file(path, (json.dumps(content, indent=2) + "\n").encode())


def adopt_tokenizer(path: str | pathlib.Path, run_dir: pathlib.Path) -> None:
    """`data.tokenizer`'s files in the run, under the names checkpoints use: generate, eval and export find them."""
    tokenizer = load_tokenizer(path)
    main, *others = tokenizer.files
    replace_file(run_dir / ("tokenizer.json" if main.suffix == ".json" else "tokenizer.model"), main.read_bytes())
    for other in others:
        if other.name not in TOKENIZER_MODEL_FILES:  # the folder's other model file is not this tokenizer
            replace_file(run_dir / other.name, other.read_bytes())


def adopt_checkpoint_files(init_from: pathlib.Path, run_dir: pathlib.Path) -> None:
    """Copies init_from's tokenizer files and generation settings into the run (exports carry them)."""
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (init_from / name).is_file():
            replace_file(run_dir / name, (init_from / name).read_bytes())
