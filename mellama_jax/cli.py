"""The `mellama` command (DESIGN §4): a table of subcommands, each parsed and run by its stage's `cli.py`.

User mistakes print one line and exit 2; no raw tracebacks.

What the machine refuses (a full disk, a read-only or missing folder) is a one-line error too, naming the
file. `MELLAMA_DEBUG=1` shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from mellama_jax import compile_cache, hardware
from mellama_jax.data import cli as data_cli
from mellama_jax.demo import cli as demo_cli
from mellama_jax.errors import UserError
from mellama_jax.evaluation import cli as evaluation_cli
from mellama_jax.hf import cli as hf_cli
from mellama_jax.inference import cli as inference_cli
from mellama_jax.planning import cli as planning_cli
from mellama_jax.training import cli as training_cli

# OS errors that are about the user's machine or paths, not bugs of ours: reported in one line.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                   errno.ENOENT, errno.EEXIST}  # fmt: skip


# The subcommands, in the order `mellama --help` lists them; each stage's `add_commands` adds its own.
# Those modules import nothing heavy (jax, orbax, ...) until their command runs.
STAGES = (demo_cli, planning_cli, hf_cli, data_cli, inference_cli, training_cli, evaluation_cli)
# The commands that run a model, with JAX's persistent compilation cache on (compile_cache.py); lm-eval passes
# every argument on to lm-eval, so there MELLAMA_COMPILE_CACHE=off is the way to turn it off.
MODEL_COMMANDS = ("demo", "generate", "serve", "train", "eval", "lm-eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mellama", description="Me-LLaMA training system in JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        stage.add_commands(commands)
    for name in MODEL_COMMANDS[:-1]:
        commands.choices[name].add_argument(
            "--no-compile-cache", action="store_true",
            help=f"compile every program afresh, without JAX's persistent cache (or set {compile_cache.ENV}=off)",
        )  # fmt: skip
    return parser


# What orbax and tensorstore print when one of their operations fails: a traceback logged per background
# thread and per abandoned asyncio task, and "Event loop is closed" from futures that finish after the loop
# that awaited them was closed. The failure itself is raised to our code, which reports it in one line.
_RELAYED = ("raised an exception", "Failed to run", "(save_finalize) failed", "exception was never retrieved")


def _relayed(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and any(m in record.getMessage() for m in _RELAYED))


def _abandoned(unraisable) -> bool:
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine of orbax's, garbage-collected unfinished
    closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
    return closed or "orbax" in getattr(code, "co_filename", "")


def _quiet_library_failures() -> None:
    """Silences orbax's and tensorstore's own reports of failures that they also raise to us (process-wide, once)."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_relayed)  # adding the same filter again is a no-op
    if not getattr(sys.unraisablehook, "mellama", False):
        default = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: None if _abandoned(unraisable) else default(unraisable)
        sys.unraisablehook.mellama = True


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return f"{where}: {e.strerror}" if where else e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _choose_platform(command: str, log: logging.Logger) -> None:
    """On a host with no GPU or TPU, jax runs on the CPU at once, instead of first trying the CUDA plugin and
    libtpu that the `cuda`/`tpu` extras install (each prints its failure). `JAX_PLATFORMS` set by the user wins."""
    if "JAX_PLATFORMS" in os.environ or hardware.accelerators_visible():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if command != "plan":  # plan compiles for the devices it is asked about, wherever it runs
        log.info("no GPU or TPU on this host: running on the CPU (set JAX_PLATFORMS to choose)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger, handler = logging.getLogger("mellama_jax"), logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"mellama {args.command}: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # libraries (absl) may configure the root logger; print ours once
    if not os.environ.get("MELLAMA_DEBUG"):
        _quiet_library_failures()
    _choose_platform(args.command, logger)
    try:
        model_command = args.command in MODEL_COMMANDS
        if model_command:
            compile_cache.enable(logger, off=getattr(args, "no_compile_cache", False))
        args.run(args)
        if model_command:
            compile_cache.report(logger)
    except (UserError, OSError) as e:
        if os.environ.get("MELLAMA_DEBUG") or (isinstance(e, OSError) and e.errno not in _USER_OS_ERRORS):
            raise
        print(f"mellama {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
