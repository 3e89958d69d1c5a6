"""Output folders that never lose what a user already has.

A command writes into a fresh hidden folder beside its target and renames it into place only once
everything is written, so a failed or killed run leaves the target as it was. A target that exists
and is not empty is refused unless the user asked to overwrite it.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from mellama_jax.errors import UserError


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():  # only reached when empty or when overwriting: swap, then drop the old one
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)
