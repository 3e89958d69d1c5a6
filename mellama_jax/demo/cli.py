"""`mellama demo`: the whole pipeline in miniature on the built-in corpus."""

from __future__ import annotations

import argparse
import pathlib
import time


def _demo(args: argparse.Namespace) -> None:
    from mellama_jax.demo.pipeline import run_demo

    begun = time.monotonic()
    print(run_demo(args.out), end="")
    print(f"demo done in {(time.monotonic() - begun) / 60:.1f} min; this summary is in {args.out / 'summary.md'}")


def add_commands(commands) -> None:
    demo = commands.add_parser("demo", help="the Me-LLaMA pipeline in miniature: CPT, LoRA SFT, eval, HF export")
    demo.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/demo"),
                      help="folder for everything it writes (default runs/demo; a re-run resumes)")  # fmt: skip
    demo.set_defaults(run=_demo)
