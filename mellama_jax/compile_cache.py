"""JAX's persistent compilation cache, on for every command that runs a model: the second `mellama eval`,
`generate`, `serve` or `lm-eval` of a model loads its programs instead of compiling them again.

The folder is `$MELLAMA_COMPILE_CACHE`, else JAX's own `$JAX_COMPILATION_CACHE_DIR`, else
`$XDG_CACHE_HOME/mellama/jax-compile` (`~/.cache/...`);
`MELLAMA_COMPILE_CACHE=off` or a command's `--no-compile-cache` turns it off. Entries are evicted least
recently used past 4 GiB, which also makes JAX take a file lock around every read and write, so processes
sharing the folder do not read each other's half-written entries. A folder that cannot be written is a one-line
warning and a run without the cache; an entry that cannot be read, or written (a full disk), is a one-line
warning and a compile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import tempfile
import warnings

ENV = "MELLAMA_COMPILE_CACHE"
OFF = ("off", "0", "false", "no")
# Programs that compile in under 0.1 s are not worth a file; past 4 GiB the least recently used go.
SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.1, "jax_compilation_cache_max_size": 4 << 30}
# JAX's warnings when an entry cannot be read (a truncated file) or written (a full disk): what we say instead
_FAILURES = {"Error reading persistent compilation cache entry": "read, compiling it afresh",
             "Error writing persistent compilation cache entry": "written, running without it"}  # fmt: skip


@dataclasses.dataclass
class Tally:
    """What this process compiled: programs, seconds spent (loading included), and how many the cache gave."""

    folder: pathlib.Path | None = None
    programs: int = 0
    seconds: float = 0.0
    loaded: int = 0


TALLY = Tally()


def folder() -> pathlib.Path | None:
    """Where the cache lives, or None when the environment turns it off."""
    value = (os.environ.get(ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR") or "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return pathlib.Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "mellama" / "jax-compile"


def enable(log: logging.Logger, off: bool = False) -> None:
    """Points JAX at the cache (unless `off`) and counts compilations for `report`. Imports jax: call it once the
    platform is chosen."""
    import jax

    _count(jax)
    vars(TALLY).update(vars(Tally()))  # this command's own
    where = None if off else folder()
    if where is None:
        jax.config.update("jax_enable_compilation_cache", False)  # JAX_COMPILATION_CACHE_DIR included
        log.info("compilation cache off")
        return
    try:
        where.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        jax.config.update("jax_enable_compilation_cache", False)
        log.warning("compilation cache %s cannot be written (%s): compiling without it", where, e.strerror or e)
        return
    jax.config.update("jax_compilation_cache_dir", str(where))
    for name, value in SETTINGS.items():  # JAX's own environment variables, where set, win
        if name.upper() not in os.environ:
            jax.config.update(name, value)
    TALLY.folder = where
    _warn_in_one_line(log)


def report(log: logging.Logger) -> None:
    """Logs what compiling cost this process, when it compiled anything."""
    if TALLY.programs:
        cached = f", {TALLY.loaded} loaded from the cache in {TALLY.folder}" if TALLY.folder else ""
        log.info("compiled %d programs in %.1f s%s", TALLY.programs, TALLY.seconds, cached)  # loading counted


def _count(jax) -> None:
    if getattr(_count, "listening", False):
        return
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    def compiled(event: str, seconds: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            TALLY.programs += 1
            TALLY.seconds += seconds

    def hit(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            TALLY.loaded += 1

    jax.monitoring.register_event_duration_secs_listener(compiled)
    jax.monitoring.register_event_listener(hit)
    _count.listening = True


def _warn_in_one_line(log: logging.Logger) -> None:
    """JAX's warnings for an entry it cannot read or write as one line of ours, once per kind and process."""
    if getattr(warnings.showwarning, "mellama", False):
        return
    shown, told = warnings.showwarning, set()

    def show(message, category, filename, lineno, file=None, line=None):
        kind = next((k for k in _FAILURES if str(message).startswith(k)), None)
        if kind is None:
            return shown(message, category, filename, lineno, file, line)
        if kind not in told:
            told.add(kind)
            log.warning("compilation cache %s: an entry could not be %s (%s); deleting the folder rebuilds it",
                        TALLY.folder, _FAILURES[kind], str(message).rpartition(": ")[2][:120])  # fmt: skip

    show.mellama = True
    warnings.showwarning = show
