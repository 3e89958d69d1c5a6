"""Output folders that never lose what a user already has, and leave no debris.

A command writes into a fresh hidden folder beside its target (`.NAME.partial-PID@HOST-XXXXXXXX`) and
renames it into place only once everything is written, so a failed or killed run leaves the target as it
was. A failed run removes its partial folder once its writers have stopped (`remove_settled`); a killed one
cannot, so the next run into the same target
removes the partials of processes of this host that are gone (never those of a live process). A target
that exists and is not empty is refused unless the user asked to overwrite it. A full disk is reported
as an OSError naming the target, whichever library noticed it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import pathlib
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence

from mellama_jax.errors import UserError

log = logging.getLogger(__name__)

# A failed save's other writes go on in tensorstore's own threads (orbax raises the first failure without
# waiting for the rest; no Python thread to join): one that lands after the partial folder was removed makes
# its directories again, within milliseconds. A removed folder is gone for good once it has stayed away this long.
SETTLE_S = 0.5
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# tensorstore (under orbax) says "... [os_error_code='28']" in a ValueError; array_record a RuntimeError
# "write() failed: No space left on device; ..."
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def disk_full(e: BaseException) -> int | None:
    """ENOSPC or EDQUOT if `e`, or an exception it was raised from, says the disk or quota is full."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e.errno
        text = str(e)
        codes = [int(c) for c in _OS_ERROR_CODE.findall(text) if int(c) in _DISK_FULL]
        codes += [c for c in _DISK_FULL if os.strerror(c) in text]
        if codes:
            return codes[0]
        e = e.__cause__ or e.__context__
    return None


def pid_alive(pid: object) -> bool:
    """Whether a process of this id runs on this host (anything but an int id: no)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _hidden(out_dir: pathlib.Path, kind: str) -> pathlib.Path:
    """A new hidden folder beside `out_dir` whose name says which process of which host owns it."""
    prefix = f".{out_dir.name}.{kind}-{os.getpid()}@{_HOST}-"
    folder = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the output it becomes gets the usual permissions
    return folder


def remove_stale(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Removes the partial (and swapped-out) folders that ended processes of this host left beside `out_dir`."""
    owned = re.compile(re.escape(f".{out_dir.name}.") + r"(?:partial|old)-(\d+)@(.+)-[a-z0-9_]+")
    removed = []
    for path in sorted(out_dir.parent.iterdir()) if out_dir.parent.is_dir() else ():
        match = owned.fullmatch(path.name)
        if match and match.group(2) == _HOST and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by an interrupted run (process %s has ended)", path, match.group(1))
            removed.append(path)
    return removed


def remove_settled(folder: pathlib.Path, patience_s: float = 60.0) -> None:
    """Removes `folder`, and again each time a writer still in flight brings it back, until it has stayed away
    for SETTLE_S seconds (or `patience_s` have passed: then it is left, with a warning naming it)."""
    deadline = time.monotonic() + patience_s
    while True:
        shutil.rmtree(folder, ignore_errors=True)
        quiet_until = time.monotonic() + SETTLE_S
        while time.monotonic() < quiet_until and not os.path.lexists(folder):
            time.sleep(0.01)
        if not os.path.lexists(folder):
            return
        if time.monotonic() > deadline:
            log.warning("%s: still being written %.0f s after the failure; left in place", folder, patience_s)
            return


def _check_parent(out_dir: pathlib.Path) -> None:
    ancestor = out_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{out_dir}: {ancestor} is a file, not a folder")


@contextlib.contextmanager
def staged_output(
    out_dir: pathlib.Path, overwrite: bool = False, inputs: Sequence[pathlib.Path] = ()
) -> Iterator[pathlib.Path]:
    """Yields an empty folder to write into; on success it becomes `out_dir`."""
    out_dir = pathlib.Path(out_dir).absolute()
    for source in inputs:
        source = pathlib.Path(source).resolve()
        if source == out_dir.resolve() or out_dir.resolve() in source.parents:
            raise UserError(f"{out_dir}: the output folder would replace the input {source}")
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: exists and is not empty; pass --overwrite to replace it")
    _check_parent(out_dir)
    remove_stale(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = _hidden(out_dir, "partial")
    except OSError as e:  # a read-only or full parent: name the output, not our hidden folder
        raise OSError(e.errno, e.strerror, str(out_dir)) from e
    try:
        yield staging
        _swap_in(staging, out_dir, overwrite)
    except BaseException as e:
        remove_settled(staging)
        code = disk_full(e)
        if code:
            raise OSError(code, os.strerror(code), str(out_dir)) from e
        raise


def _swap_in(staging: pathlib.Path, out_dir: pathlib.Path, overwrite: bool) -> None:
    if not overwrite or not out_dir.exists():
        try:  # rename(2) replaces an empty folder and refuses a full one: another writer's output is never lost
            staging.rename(out_dir)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise UserError(f"{out_dir}: written by another process while this one ran; left as it is") from None
        return
    # overwriting: swap, then drop the old one
    old = _hidden(out_dir, "old")
    out_dir.rename(old / out_dir.name)
    try:
        staging.rename(out_dir)
    except BaseException:
        (old / out_dir.name).rename(out_dir)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def replace_file(path: pathlib.Path, data: bytes) -> None:
    """`data` written beside `path`, synced, and renamed into place: a kill or a full disk leaves either the
    old file or the new one, and no partial beside it."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e


def sha256_of(path: pathlib.Path) -> str:
    """ "sha256:<hex>" of a file's bytes, or of a folder's files in sorted order, each as relative path, NUL, bytes."""
    path, digest = pathlib.Path(path), hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
