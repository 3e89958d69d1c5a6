"""Staged output folders: partials named by their process, stale ones removed, full disks named by the output."""

import errno
import logging
import os
import re
import subprocess

import pytest

from mellama_jax import outdir
from mellama_jax.errors import UserError
from mellama_jax.outdir import disk_full, staged_output

# What the libraries under us raise on a full disk (tmpfs of 2 MiB): orbax passes tensorstore's ValueError
# through, array_record's writer raises a RuntimeError from close().
ORBAX_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local file "/x/p.orbax-checkpoint-tmp/'
    'ocdbt.process_0/": Failed writing: "/x/p.orbax-checkpoint-tmp/ocdbt.process_0/d/e733b58e": Failed to '
    "write 1791837 bytes to file 14: No space left on device [os_error_code='28']"
)
ARRAY_RECORD_FULL = (
    "write() failed: No space left on device; writing /x/shard-00000.array_record; at byte 2097152; "
    "Failed to close chunk_writer"
)


def ended_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_partials_are_named_by_their_process_and_host(tmp_path):
    with staged_output(tmp_path / "out") as staging:
        assert staging.parent == tmp_path
        assert staging.name.startswith(f".out.partial-{os.getpid()}@{outdir._HOST}-")
        (staging / "weights").write_text("w")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_outputs_get_the_usual_permissions_not_0700(tmp_path):
    old = os.umask(0o027)
    try:
        with staged_output(tmp_path / "out"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def test_the_next_run_removes_partials_of_ended_processes_of_this_host_only(tmp_path, caplog):
    dead, host = ended_pid(), outdir._HOST
    stale = [tmp_path / f".out.partial-{dead}@{host}-abc12_xy", tmp_path / f".out.old-{dead}@{host}-q1w2e3r4"]
    kept = [
        tmp_path / f".out.partial-{os.getpid()}@{host}-def456zz",  # a live process: still writing
        tmp_path / f".out.partial-{dead}@elsewhere.example-ghi789aa",  # another machine: cannot tell
        tmp_path / f".outer.partial-{dead}@{host}-jkl0mno1",  # another target's
        tmp_path / ".out.partial-q8w7e6r5",  # an unnamed owner
    ]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "shard-00000.array_record").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="mellama_jax"), staged_output(tmp_path / "out") as staging:
        (staging / "weights").write_text("w")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (tmp_path / "out" / "weights").read_text() == "w"
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"removed {p}, left by an interrupted run (process {dead} has ended)" for p in sorted(stale)]


@pytest.mark.parametrize(
    "error, code",
    [
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),  # a plain write(): no file name
        (ValueError(ORBAX_FULL), errno.ENOSPC),
        (RuntimeError(ARRAY_RECORD_FULL), errno.ENOSPC),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
    ],
    ids=["oserror", "orbax", "array_record", "quota"],
)
def test_a_full_disk_is_one_oserror_naming_the_output_and_leaves_nothing(tmp_path, error, code):
    with pytest.raises(OSError) as raised, staged_output(tmp_path / "out") as staging:
        (staging / "weights").write_text("half")
        raise error
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        code,
        os.strerror(code),
        str(tmp_path / "out"),
    )
    assert list(tmp_path.iterdir()) == []


def test_disk_full_reads_wrapped_library_errors_and_nothing_else():
    try:
        try:
            raise ValueError(ORBAX_FULL)
        except ValueError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as e:
        wrapped = e
    assert disk_full(wrapped) == errno.ENOSPC
    assert disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory [os_error_code='12']")) is None
    assert disk_full(OSError(errno.EACCES, "Permission denied")) is None


def test_an_output_under_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt" / "out", tmp_path / "notes.txt" / "deeper" / "out"):
        message = re.escape(f"{out}: {tmp_path / 'notes.txt'} is a file, not a folder")
        with pytest.raises(UserError, match=f"^{message}$"), staged_output(out):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_second_writer_into_the_same_output_never_replaces_the_first(tmp_path):
    message = r"out: written by another process while this one ran; left as it is"
    with pytest.raises(UserError, match=message), staged_output(tmp_path / "out") as late:
        (late / "weights").write_text("late")
        with staged_output(tmp_path / "out") as early:  # started after, finished first
            (early / "weights").write_text("early")
    assert (tmp_path / "out" / "weights").read_text() == "early"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial left behind
