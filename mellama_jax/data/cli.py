"""`mellama prepare`: corpora tokenized into array_record shards with a manifest."""

from __future__ import annotations

import argparse
import pathlib

from mellama_jax.errors import UserError


def _prepare(args: argparse.Namespace) -> None:
    from mellama_jax.data.prepare import prepare

    if args.workers < 0:
        raise UserError(f"--workers must be at least 0, got {args.workers}")
    manifest = prepare(args.sources, args.tokenizer, args.out, args.format, args.text_field, args.on_error,
                       args.workers, args.overwrite)  # fmt: skip
    skipped = f", {manifest['skipped']} malformed skipped" if manifest["skipped"] else ""
    print(f"prepared {manifest['documents']} documents, {manifest['tokens']} tokens{skipped} in {args.out}")


def add_commands(commands) -> None:
    from mellama_jax.data.sources import EXTENSIONS

    prepare = commands.add_parser("prepare", help="tokenize corpora into array_record shards + a manifest")
    prepare.add_argument("sources", nargs="+", metavar="SOURCES", help="files, folders or glob patterns")
    prepare.add_argument("--tokenizer", required=True, help="tokenizer.model / tokenizer.json, or a folder with one")
    prepare.add_argument("--out", required=True, type=pathlib.Path, help="the prepared corpus folder")
    prepare.add_argument("--format", default="", choices=("", *EXTENSIONS.values()), help="default: from the extension")
    prepare.add_argument("--text-field", default="text", help="jsonl/parquet/array_record field (default text)")
    prepare.add_argument("--on-error", default="raise", choices=("raise", "skip"), help="malformed records")
    prepare.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: one per core)")
    prepare.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    prepare.set_defaults(run=_prepare)
